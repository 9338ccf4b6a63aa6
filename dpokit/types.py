"""The values every layer passes around: a batch of pairs and one model's outputs on it.

This module sits at the bottom of the house (docs/architecture.md): it imports nothing from dpokit
but `dpokit.errors`, so data, log-probs, losses, the reference and metrics can all depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from dpokit.errors import DpokitError


class Segment(NamedTuple):
    """One attention-isolated piece of a packed row: columns ``start .. start+length-1`` of row `row`.

    ``shared`` tokens every later token sees, then one block of tokens per branch: each branch sees the shared
    tokens and itself, never another branch, and its positions continue from the shared part's end. A plain
    sequence is ``(shared=n, branches=())``; a prefix-shared pair is ``(prompt, (chosen, rejected))``; a ranked
    group of k completions is ``(prompt, (c_1, ..., c_k))``.
    """

    row: int
    start: int
    shared: int
    branches: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return self.shared + sum(self.branches)

    def branch_starts(self) -> list[int]:
        """Column (within the row) of each branch's first token."""
        starts, column = [], self.start + self.shared
        for size in self.branches:
            starts.append(column)
            column += size
        return starts


@dataclass
class PairBatch:
    """A batch as model inputs: B pairs (slots ``0..B-1`` chosen, ``B..2B-1`` rejected), or G ranked groups of k_g
    completions each (``group_sizes``; slots numbered group by group, group g's completions after those of
    groups ``0..g-1``). `dpokit.data.collate` builds both; `dpokit.logps` needs only the target fields."""

    input_ids: torch.Tensor  # [R, L] long
    attention_mask: torch.Tensor  # [R, L] long, 1 on real tokens (padded layout: the model's padding mask)
    target_rows: torch.Tensor  # [M] long, one entry per completion token in the batch
    target_cols: torch.Tensor  # [M] long, column whose hidden state predicts the token
    target_ids: torch.Tensor  # [M] long
    target_slots: torch.Tensor  # [M] long, 0..B-1 chosen, B..2B-1 rejected
    index: torch.Tensor  # [B] long, example index of each pair in its split
    num_tokens: int  # tokens the model computes (padding excluded)
    position_ids: Optional[torch.Tensor] = None  # [R, L]; None: 0..L-1 in every row
    completion_mask: Optional[torch.Tensor] = None  # [R, L] bool, padded layout only
    token_mask: Optional[torch.Tensor] = None  # [R, L] long, 1 on real tokens (0 on padding)
    segments: Optional[tuple[Segment, ...]] = None  # packed / prefix-shared layouts: who attends to whom (O(L))
    slot_counts: Optional[tuple[int, ...]] = None  # [outputs] completion tokens per output, on the host: no device read
    group_sizes: Optional[tuple[int, ...]] = None  # ranked groups: completions per group (None: pairs)
    # Host floats, in slot order: [C] a ranked group's completions' scores (higher is better); [2B] a scored pair
    # batch's ``chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}`` (nan where a row has none); None: pairs without.
    scores: Optional[tuple[float, ...]] = None

    @property
    def num_pairs(self) -> int:
        """Examples in the batch: pairs, or ranked groups."""
        return int(self.index.numel())

    @property
    def is_grouped(self) -> bool:
        """Groups of completions behind each prompt (ranked or unpaired data), not pairs."""
        return self.group_sizes is not None

    @property
    def num_outputs(self) -> int:
        """Completions in the batch: 2B for pairs, the sum of the group sizes for ranked groups."""
        return sum(self.group_sizes) if self.group_sizes is not None else 2 * self.num_pairs

    def to(self, device: torch.device | str) -> "PairBatch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "PairBatch":
        """A copy in page-locked memory (what `DataLoader(pin_memory=True)` calls), for asynchronous copies to CUDA."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> "PairBatch":
        return PairBatch(
            **{f.name: fn(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v for f in fields(self)}
        )


@dataclass
class ChosenRejectedOutputs:
    """One model's outputs (policy or reference) on a batch of B pairs: what a loss receives.

    Per pair (``[B]``): ``chosen_logps``/``rejected_logps``, the sums of log p over each completion's
    tokens (float32), and ``chosen_tokens``/``rejected_tokens``, their token counts.

    Per token (padded ``[B, T]``, T the batch's longest completion of that side): ``chosen_token_logps``
    and ``rejected_token_logps`` hold log p of each completion token in order, 0 after the last;
    ``chosen_token_mask``/``rejected_token_mask`` are True on real tokens. The policy always has them;
    a cached reference has them when the cache was built with ``dpokit ref-logps --per-token`` (a loss
    that needs them sets ``needs_per_token_reference = True``).

    ``token_stats`` holds full-vocabulary values per token, computed inside the chunked projection
    only when the loss names them in its ``token_stats`` attribute: ``"log_sq_norm"`` is
    ``log sum_v p(v)^2`` (WPO's normaliser) and ``"entropy"`` is ``-sum_v p(v) log p(v)``; each maps
    to ``(chosen [B, Tc], rejected [B, Tr])``, padded like the token log-probs.

    Unlike torchtune's dataclass of the same name, ``chosen_logits``/``rejected_logits`` are not the
    ``[B, T, V]`` logits (dpokit never materialises them) but one detached number per sequence, the mean
    logit over completion positions and vocabulary, kept as a diagnostic for the metrics. Use the
    per-token log-probs and ``token_stats`` instead.

    ``chosen_scores``/``rejected_scores`` (``[B]`` float32, on the log-probs' device) are the pairs' scores from
    the data (``score_chosen``/``score_rejected``, higher is better, nan where a row has none) when the pairs
    were prepared with scores, policy and reference alike; None otherwise. No built-in loss reads them.
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_logits: Optional[Tensor] = None
    rejected_logits: Optional[Tensor] = None
    chosen_tokens: Optional[Tensor] = None
    rejected_tokens: Optional[Tensor] = None
    router_aux_loss: Optional[Tensor] = None  # scalar: a mixture-of-experts policy's load-balancing term
    chosen_token_logps: Optional[Tensor] = None  # [B, Tc]
    rejected_token_logps: Optional[Tensor] = None  # [B, Tr]
    chosen_token_mask: Optional[Tensor] = None  # [B, Tc] bool
    rejected_token_mask: Optional[Tensor] = None  # [B, Tr] bool
    token_stats: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    chosen_scores: Optional[Tensor] = None  # [B] float32, pairs prepared with scores only
    rejected_scores: Optional[Tensor] = None  # [B] float32

    def average_logps(self) -> tuple[Tensor, Tensor]:
        """Length-normalised log-probs (sum over completion tokens / their count)."""
        if self.chosen_tokens is None or self.rejected_tokens is None:
            raise DpokitError("this loss needs completion token counts (chosen_tokens/rejected_tokens)")
        return (
            self.chosen_logps / self.chosen_tokens.clamp(min=1).to(self.chosen_logps.dtype),
            self.rejected_logps / self.rejected_tokens.clamp(min=1).to(self.rejected_logps.dtype),
        )

    @property
    def has_token_logps(self) -> bool:
        return self.chosen_token_logps is not None and self.rejected_token_logps is not None


@dataclass
class RankedOutputs:
    """One model's outputs (policy or reference) on a batch of G ranked groups: a prompt and k_g >= 2 completions
    each, C = k_1 + ... + k_G completions in all, listed group by group (group g's after groups ``0..g-1``).

    Per completion (``[C]``): ``logps`` (float32 sums over its tokens), ``tokens`` (counts), ``scores`` (float32,
    from the data: higher is better, equal scores are ties) and ``mean_logits`` (a detached diagnostic, as in
    `ChosenRejectedOutputs`). Per token (``[C, T]``, T the batch's longest completion): ``token_logps``, 0 after
    each completion's last token, ``token_mask`` True on real tokens, and ``token_stats`` by name. A listwise loss
    (``is_listwise = True``) receives these; a pairwise loss receives the pairs its pairing rule picks from them
    (`dpokit.losses.ranked`).
    """

    logps: Tensor  # [C]
    group_sizes: tuple[int, ...]  # [G], on the host
    scores: Optional[Tensor] = None  # [C], on the logps' device
    tokens: Optional[Tensor] = None  # [C]
    mean_logits: Optional[Tensor] = None  # [C]
    router_aux_loss: Optional[Tensor] = None
    token_logps: Optional[Tensor] = None  # [C, T]
    token_mask: Optional[Tensor] = None  # [C, T] bool
    token_stats: dict[str, Tensor] = field(default_factory=dict)  # name -> [C, T]
    host_scores: Optional[Tensor] = None  # [C] the scores on the host: pairing rules read them without a device read

    @property
    def num_groups(self) -> int:
        return len(self.group_sizes)

    @property
    def num_completions(self) -> int:
        return int(self.logps.shape[0])

    def group_index(self) -> Tensor:
        """``[C]`` long: the group of each completion."""
        sizes = torch.tensor(self.group_sizes, dtype=torch.long)
        return torch.repeat_interleave(torch.arange(len(self.group_sizes)), sizes).to(self.logps.device)

    def group_starts(self) -> Tensor:
        """``[G]`` long: the index of each group's first completion."""
        sizes = torch.tensor(self.group_sizes, dtype=torch.long)
        return (torch.cumsum(sizes, 0) - sizes).to(self.logps.device)

    def padded(self, values: Tensor, fill: float = 0.0) -> tuple[Tensor, Tensor]:
        """Per-completion `values` ``[C, ...]`` as ``[G, K, ...]`` (K the largest group) with `fill` after each
        group's last completion, and the ``[G, K]`` bool mask of real completions."""
        g, k = self.num_groups, max(self.group_sizes, default=0)
        index = self.group_index()
        position = torch.arange(values.shape[0], device=values.device) - self.group_starts()[index]
        out = values.new_full((g, k, *values.shape[1:]), fill)
        mask = torch.zeros((g, k), dtype=torch.bool, device=values.device)
        out[index, position] = values
        mask[index, position] = True
        return out, mask

    def average_logps(self) -> Tensor:
        """Length-normalised log-probs ``[C]`` (sum over completion tokens / their count)."""
        if self.tokens is None:
            raise DpokitError("this loss needs completion token counts (tokens)")
        return self.logps / self.tokens.clamp(min=1).to(self.logps.dtype)

    @property
    def has_token_logps(self) -> bool:
        return self.token_logps is not None


@dataclass
class UnpairedOutputs:
    """One model's outputs (policy or reference) on a batch of N unpaired examples (KTO's shape): a prompt, its
    completion labelled desirable or undesirable, and the mismatched completion `prepare` fixed for the example
    (another example's, behind this prompt) whose log-ratio estimates KTO's KL term.

    Per example (``[N]``): ``logps`` and ``tokens`` of the completion, ``kl_logps`` and ``kl_tokens`` of the
    mismatched one, ``desirable`` (bool, from the data) and ``mean_logits`` (a detached diagnostic). Per token
    (``[N, T]``): the completion's ``token_logps`` and ``token_mask``. An unpaired loss (``is_unpaired = True``)
    receives these (`unpaired_outputs` makes them from the batch's groups of two).
    """

    logps: Tensor  # [N]
    kl_logps: Tensor  # [N]
    desirable: Tensor  # [N] bool
    tokens: Optional[Tensor] = None  # [N]
    kl_tokens: Optional[Tensor] = None  # [N]
    mean_logits: Optional[Tensor] = None  # [N]
    router_aux_loss: Optional[Tensor] = None
    token_logps: Optional[Tensor] = None  # [N, T]
    token_mask: Optional[Tensor] = None  # [N, T] bool

    @property
    def num_examples(self) -> int:
        return int(self.logps.shape[0])

    def average_logps(self) -> Tensor:
        """Length-normalised log-probs of the completions ``[N]``."""
        if self.tokens is None:
            raise DpokitError("this loss needs completion token counts (tokens)")
        return self.logps / self.tokens.clamp(min=1).to(self.logps.dtype)


def unpaired_outputs(outputs: RankedOutputs) -> UnpairedOutputs:
    """The `UnpairedOutputs` of a batch of unpaired examples, each stored as a group of two (docs/data-formats.md,
    "Unpaired data"): ``[completion, kl_completion]`` with scores ``[label, nan]`` (1.0 desirable, 0.0 not)."""
    if any(size != 2 for size in outputs.group_sizes) or outputs.scores is None:
        raise DpokitError(
            "unpaired outputs come from groups of two completions with scores (the completion and its KL completion); "
            f"got group sizes {sorted(set(outputs.group_sizes))}: is this data prepared as unpaired?"
        )

    def own(values: Optional[Tensor]) -> Optional[Tensor]:
        return None if values is None else values[0::2]

    def mismatched(values: Optional[Tensor]) -> Optional[Tensor]:
        return None if values is None else values[1::2]

    return UnpairedOutputs(
        logps=own(outputs.logps),
        kl_logps=mismatched(outputs.logps),
        desirable=own(outputs.scores) > 0.5,
        tokens=own(outputs.tokens),
        kl_tokens=mismatched(outputs.tokens),
        mean_logits=own(outputs.mean_logits),
        router_aux_loss=outputs.router_aux_loss,
        token_logps=own(outputs.token_logps),
        token_mask=own(outputs.token_mask),
    )


def pair_scores(
    scores: Optional[Sequence[float]], num_pairs: int, device: torch.device | str
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """A scored pair batch's `PairBatch.scores` (chosen ones first, then rejected) as ``(chosen [B], rejected [B])``
    float32 tensors on `device`, copied from the host (no device read); ``(None, None)`` without scores."""
    if scores is None:
        return None, None
    both = torch.tensor(scores, dtype=torch.float32).view(2, num_pairs).to(device, non_blocking=True)
    return both[0], both[1]


def ranked_token_values(
    values: Tensor, slots: Tensor, num_outputs: int, slot_counts: Optional[Sequence[int]] = None
) -> tuple[Tensor, Tensor]:
    """Ragged per-token `values` ``[M, ...]`` (grouped by output ``0..num_outputs-1`` in ascending order, each
    output's tokens in token order) as ``(padded [C, T, ...], mask [C, T])``, zeros after each output's last token.
    `slot_counts` (tokens per output, known on the host) sizes them without reading the device."""
    if slot_counts is not None:
        counts = torch.tensor(slot_counts, dtype=torch.long).to(slots.device, non_blocking=True)
        width = max(slot_counts, default=0)
    else:
        counts = torch.zeros(num_outputs, dtype=torch.long, device=slots.device).index_add(
            0, slots, torch.ones_like(slots)
        )
        width = int(counts.max()) if num_outputs else 0
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.arange(slots.numel(), device=slots.device) - starts[slots]
    padded = values.new_zeros((num_outputs, width, *values.shape[1:]))
    mask = torch.zeros((num_outputs, width), dtype=torch.bool, device=values.device)
    padded[slots, positions] = values
    mask[slots, positions] = True
    return padded, mask


def split_token_values(
    values: Tensor, slots: Tensor, num_pairs: int, slot_counts: Optional[Sequence[int]] = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ragged per-token `values` ``[M, ...]`` into padded chosen and rejected tensors.

    `slots` ``[M]`` gives each token's output (``0..B-1`` chosen, ``B..2B-1`` rejected), grouped by output in
    ascending order with each output's tokens in token order (as `dpokit.logps.completion_logps` and the cache
    give them). Returns ``(chosen [B, Tc, ...], chosen_mask [B, Tc], rejected [B, Tr, ...],
    rejected_mask [B, Tr])``, zeros after each completion's last token. `slot_counts` (tokens per output, known on
    the host from the batch) sizes them without reading the device.
    """
    outputs = 2 * num_pairs
    if slot_counts is not None:
        counts = torch.tensor(slot_counts, dtype=torch.long).to(slots.device, non_blocking=True)
        widths = [max(slot_counts[:num_pairs], default=0), max(slot_counts[num_pairs:], default=0)]
    else:
        counts = torch.zeros(outputs, dtype=torch.long, device=slots.device).index_add(0, slots, torch.ones_like(slots))
        widths = [
            int(counts[low:high].max()) if high > low else 0 for low, high in ((0, num_pairs), (num_pairs, outputs))
        ]
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.arange(slots.numel(), device=slots.device) - starts[slots]
    halves = []
    for (low, high), width in zip(((0, num_pairs), (num_pairs, outputs)), widths):
        padded = values.new_zeros((high - low, width, *values.shape[1:]))
        mask = torch.zeros((high - low, width), dtype=torch.bool, device=values.device)
        keep = (slots >= low) & (slots < high)
        padded[slots[keep] - low, positions[keep]] = values[keep]
        mask[slots[keep] - low, positions[keep]] = True
        halves += [padded, mask]
    return halves[0], halves[1], halves[2], halves[3]


@dataclass
class TrainResult:
    """What a training recipe's ``main(argv)`` returns (on the main rank): the run and its last metrics."""

    run_dir: Path
    steps: int  # optimizer steps the run has done
    checkpoint: Optional[Path]  # the final checkpoint
    train: dict[str, float] = field(default_factory=dict)  # the last step's metrics
    eval: dict[str, float] = field(default_factory=dict)  # the final eval (empty without an eval split)
    eval_at_start: dict[str, float] = field(default_factory=dict)  # before any update (training.eval_at_start)
