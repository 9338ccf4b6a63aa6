"""Checks that dpokit's log-probs are the model's own, before any of them is cached or trained on.

- `check_layout` (start of ``ref-logps``, ``cache verify`` and ``train``): on a few real pairs, the
  log-probs of dpokit's batch layout must equal those from the model's own ``model(ids).logits``, with the
  dense mask short rows use and with the layout kernels long rows use (`dpokit.attention`).
  Sliding windows are shrunk for the check so that short examples exercise them. A packed layout the
  family's attention cannot take falls back to the padded layout (said once); a family whose logits
  dpokit cannot reproduce at all is refused.
- `check_step_zero` (the first training step of a fresh run): the policy is the reference, so every
  log-prob difference must be zero within the compute dtype's rounding; otherwise the run stops
  before the first update and lists the likely causes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from dpokit import log
from dpokit.attention import kernels_at_every_width
from dpokit.data.collate import collate_pairs, pad_pairs
from dpokit.errors import DpokitError
from dpokit.family import UnsupportedPattern, attention_pattern, shrunk_windows
from dpokit.logps import naive_sequence_logps, sequence_logps
from dpokit.model import dtype_name
from dpokit.types import ChosenRejectedOutputs, RankedOutputs

CHECK_PAIRS = 4  # the shortest of the first CHECK_CANDIDATES pairs
CHECK_CANDIDATES = 256
CHECK_WINDOW = 3  # sliding windows are shrunk to this many tokens during the check


@dataclass(frozen=True)
class Layout:
    """How pairs are laid out in a batch (`dpokit.data.collate`)."""

    packing: bool = False
    prefix_sharing: bool = False
    pack_length: Optional[int] = None

    @property
    def name(self) -> str:
        parts = [n for n, on in (("packed", self.packing), ("prefix-shared", self.prefix_sharing)) if on]
        return " + ".join(parts) or "padded"

    @property
    def is_padded(self) -> bool:
        return not self.packing and not self.prefix_sharing


PADDED = Layout()


def tolerance(dtype: torch.dtype, tokens: Tensor) -> Tensor:
    """Largest |difference| of a sequence's log-prob that rounding explains, for `tokens` completion tokens.

    float32: 1e-3 + 1e-4 per token (observed: about 1e-5 per sequence). bfloat16/float16: 0.5 + 0.05
    per token (observed on tiny random models: up to 0.05 per token between bf16 weights and fp32
    master weights under bf16 autocast). A different model, adapter or template moves log-probs by
    whole nats per sequence.
    """
    tokens = tokens.to(torch.float32)
    if dtype == torch.float32:
        return 1e-3 + 1e-4 * tokens
    return 0.5 + 0.05 * tokens


def check_pairs(dataset) -> list[dict]:
    """The examples the start-up check runs on: the shortest of the split's first rows (pairs, or ranked groups)."""
    head = dataset[: min(CHECK_CANDIDATES, len(dataset))]
    names = [name for name in ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "scores") if name in head]
    return shortest_rows([dict(zip(names, values)) for values in zip(*(head[name] for name in names))])


def shortest_rows(rows: Sequence[dict]) -> list[dict]:
    """The `CHECK_PAIRS` shortest of `rows` (pairs, or ranked groups), by prompt plus longest completion."""

    def length(row: dict) -> int:
        completions = row["completion_ids"] if "completion_ids" in row else (row["chosen_ids"], row["rejected_ids"])
        return len(row["prompt_ids"]) + max(len(c) for c in completions)

    return sorted(rows, key=length)[:CHECK_PAIRS]


def model_name(model: nn.Module) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    return f"{getattr(config, 'name_or_path', '') or type(base).__name__} ({config.model_type})"


def check_layout(
    model: nn.Module,
    rows: Sequence[dict],
    pad_id: int,
    layout: Layout,
    announce=print,
    dtype: Optional[torch.dtype] = None,
) -> Layout:
    """The layout to use for `model`: `layout` if it reproduces ``model(ids).logits``, else the padded one.

    Raises `DpokitError` when even the padded layout differs from the model's own forward (the family
    does something between its decoder and its logits that dpokit does not reproduce).

    Args:
        dtype: the compute dtype, for the tolerance (default: the parameters' dtype).
    """
    if not rows:
        return layout
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = dtype or next(model.parameters()).dtype
    if not layout.is_padded:
        try:
            attention_pattern(base.config)
        except UnsupportedPattern as exc:
            announce(
                f"{model_name(model)}: {exc} cannot be expressed in the {layout.name} layout; using the padded layout"
            )
            layout = PADDED
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), shrunk_windows(base.config, CHECK_WINDOW):
            indices = list(range(len(rows)))
            padded = pad_pairs(rows, indices, pad_id).to(_device(model))
            expected = naive_sequence_logps(model, padded.input_ids, padded.attention_mask, padded.completion_mask)
            tokens = padded.completion_mask[:, 1:].sum(-1)
            padded_logps = sequence_logps(model, padded)[0]
            _refuse_if_different(model, padded_logps, expected, tokens, dtype)
            if layout.is_padded:
                return layout
            batch = collate_pairs(rows, indices, pad_id, layout.packing, layout.prefix_sharing, layout.pack_length)
            try:  # both kernels training may use: the dense mask (short rows) and the layout kernels (long rows)
                logps = sequence_logps(model, batch.to(_device(model)))[0]
                dense = worst_excess(logps, expected, tokens, dtype)
                with kernels_at_every_width():
                    logps = sequence_logps(model, batch.to(_device(model)))[0]
                kernels = worst_excess(logps, expected, tokens, dtype)
                reproduced = dense[0] <= 0 and kernels[0] <= 0
            except Exception as exc:  # e.g. a model that cannot take per-layer masks, attention sinks
                reproduced, logps = False, exc
            if not reproduced:
                why = f" ({type(logps).__name__}: {logps})" if isinstance(logps, Exception) else ""
                announce(
                    f"{model_name(model)}: the {layout.name} layout does not reproduce this family's attention{why}; "
                    "using the padded layout (same log-probs, more padding)"
                )
                return PADDED
            log.debug(
                f"{model_name(model)}: the {layout.name} layout reproduces the model's own forward on "
                f"{len(rows)} pairs (largest difference {max(dense[2], kernels[2]):.2e} nats)"
            )
            return layout
    finally:
        model.train(was_training)


def worst_excess(logps: Tensor, expected: Tensor, tokens: Tensor, dtype: torch.dtype) -> tuple[float, int, float]:
    """``(largest |Δ| above tolerance, its sequence, that |Δ|)``; the excess is <= 0 when all agree."""
    difference = (logps.float() - expected.float()).abs()
    excess = difference - tolerance(dtype, tokens.to(difference.device))
    worst = int(torch.argmax(excess))
    return float(excess[worst]), worst, float(difference[worst])


def _refuse_if_different(model, logps: Tensor, expected: Tensor, tokens: Tensor, dtype: torch.dtype) -> None:
    excess, worst, difference = worst_excess(logps, expected, tokens, dtype)
    if excess > 0:
        raise DpokitError(
            f"{model_name(model)}: dpokit's log-probs differ from the model's own forward (model(ids).logits) by "
            f"{difference:.3g} nats on check sequence {worst}; this family does something dpokit does not "
            "reproduce (a logits transform or attention pattern it does not know), so it is not supported. "
            "Supported families are listed in README.md; please report the model type"
        )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


STEP_ZERO_CAUSES = (
    "another base model or other weights than the cache's (model.path vs the cache's reference)",
    "another adapter (reference.adapter; the policy starts from it)",
    "another chat template or tokenizer than the prepared data's",
    "another compute dtype or attention implementation than the cache's ({cache})",
    "dropout or other train-mode randomness left on in the policy (model.disable_dropout=false)",
    "a recipe whose forward (`policy_logps`) was edited to compute other log-probs than the cache's "
    "`dpokit.logps.concatenated_forward` (then use reference.source=live, or make the cache with the same forward)",
)


def output_logps(outputs: ChosenRejectedOutputs | RankedOutputs) -> tuple[Tensor, Tensor]:
    """Every completion's log-prob and token count, flat: a pair batch's chosen then rejected (``[2B]``), a ranked
    batch's completions group by group (``[C]``)."""
    if isinstance(outputs, RankedOutputs):
        return outputs.logps, outputs.tokens
    return (
        torch.cat([outputs.chosen_logps, outputs.rejected_logps]),
        torch.cat([outputs.chosen_tokens, outputs.rejected_tokens]),
    )


def check_step_zero(
    policy,
    reference,
    dtype: torch.dtype,
    cache_description: str,
    refuse: bool = True,
    eval_logps: Optional[Callable[[], Tensor]] = None,
) -> float:
    """Stop before the first update when the policy does not start as the reference.

    `policy` and `reference` are the first micro-batch's outputs (`ChosenRejectedOutputs`, or `RankedOutputs` for
    ranked groups). Under several
    processes every rank checks its own batch and the worst is shared, so all ranks stop together.
    Returns the largest log-prob difference; with ``refuse=False`` it only measures (a 4-bit policy
    cannot start as the cache's 16-bit reference).

    Args:
        eval_logps: the same batch's per-completion log-probs (`output_logps`) from the policy in eval mode, called only when the
            check fails: where they differ from the train-mode ones, the error says the policy's train mode
            is random (dropout, router noise, sampled routing, stochastic depth) before the other causes.
    """
    logps, tokens = output_logps(policy)
    logps = logps.detach()
    reference_logps = output_logps(reference)[0].to(logps.device)
    excess, _, difference = worst_excess(logps, reference_logps, tokens, dtype)
    shared = torch.tensor([excess, difference], dtype=torch.float32, device=logps.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(shared, op=torch.distributed.ReduceOp.MAX)
    if refuse and float(shared[0]) > 0:
        if eval_logps is not None and worst_excess(logps, eval_logps().detach().to(logps.device), tokens, dtype)[0] > 0:
            raise DpokitError(
                f"step-0 check: the policy does not start as the reference (log-prob difference up to "
                f"{float(shared[1]):.3g} nats on the first batch) because its train-mode forward is random: the same "
                "batch gives other log-probs in eval mode. Either model.disable_dropout=false (set it true), or the "
                "family draws random numbers in train mode that it does not turn off (it turns off dropout, LayerDrop, "
                "stochastic depth, and the router noise and sampled routing of dpokit.model.STOCHASTIC_IN_TRAIN_MODE)"
            )
        causes = "; ".join(c.format(cache=cache_description) for c in STEP_ZERO_CAUSES)
        raise DpokitError(
            f"step-0 check: the policy does not start as the reference (log-prob difference up to {float(shared[1]):.3g} "
            f"nats on the first batch, above the {dtype_name(dtype)} tolerance). Likely causes: {causes}. "
            "Rebuild the cache with the training model and settings (`dpokit ref-logps ... --overwrite`)"
        )
    return float(shared[1])
