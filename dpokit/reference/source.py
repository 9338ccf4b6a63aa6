"""Where training gets the reference's outputs: the HDF5 cache (the default) or a live model.

Both give a `ChosenRejectedOutputs` for a batch of pairs (a `RankedOutputs` for ranked groups), so the recipe
does not care which it has.
``--ref live`` exists to prove the cache changes nothing and as the baseline the benchmarks beat.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from dpokit.data.prepared import PreparedData
from dpokit.errors import DpokitError
from dpokit.fingerprint import reference_fingerprint
from dpokit.reference.cache import open_cache
from dpokit.types import ChosenRejectedOutputs, PairBatch, RankedOutputs, pair_scores


class CachedReference:
    """Reference log-probs read from ``ref.h5``, after checking it was built from this data and model."""

    def __init__(
        self, cache_path: str, prepared: PreparedData, model_path: str, adapter: Optional[str], splits: list[str]
    ):
        cache = open_cache(cache_path)
        cache.check_matches(
            data_fingerprint=prepared.fingerprint,
            reference_fingerprint=reference_fingerprint(model_path, adapter),
            tokenizer_fingerprint=prepared.tokenizer_fingerprint,
        )
        self.path = cache_path
        self.dtype = str(cache.attrs.get("dtype", ""))
        self.attn_implementation = str(cache.attrs["attn_implementation"])
        self.rebuild_command = f"{cache.rebuild_command()} --overwrite"
        self.per_token = bool(cache.attrs["per_token"])
        self.checked_layout = cache.attrs.get(
            "checked_layout"
        )  # the layout its pass checked (none in an audit's subset)
        self.description = f"the cache's: {self.dtype}, {self.attn_implementation} attention"
        missing = [split for split in splits if split not in cache.splits]
        if missing:
            raise DpokitError(
                f"reference cache {cache_path} has no split {missing[0]!r} (it has {', '.join(cache.splits)}); "
                f"rebuild it with `dpokit ref-logps {prepared.path} --model {model_path} --out {cache_path} "
                f"--splits {','.join(splits)} --overwrite`"
            )
        self.tables = {split: cache.logps(split) for split in splits}

    def outputs(self, batch: PairBatch, split: str) -> ChosenRejectedOutputs | RankedOutputs:
        """The cached outputs of the batch's examples (with the batch's scores: a ranked batch's, or a scored pair
        batch's), on its device."""
        cached = self.tables[split].select(batch.index)
        device = batch.input_ids.device
        for name, value in vars(cached).items():
            if isinstance(value, torch.Tensor):
                setattr(cached, name, value.to(device))
        if isinstance(cached, RankedOutputs):
            cached.host_scores = torch.tensor(batch.scores, dtype=torch.float32)
            cached.scores = cached.host_scores.to(device, non_blocking=True)
        else:
            cached.chosen_scores, cached.rejected_scores = pair_scores(batch.scores, batch.num_pairs, device)
        return cached


class LiveReference:
    """The reference computed on the fly: the policy with its adapters switched off, or a frozen copy.

    `forward(model, batch)` computes the log-probs: the recipe passes its own (`policy_logps`), so an
    edited forward applies to the policy and the live reference alike.
    """

    def __init__(
        self, model: nn.Module, adapters_off: bool, forward: Callable[[nn.Module, PairBatch], ChosenRejectedOutputs]
    ):
        self.model = model
        self.adapters_off = adapters_off
        self.forward = forward

    def outputs(self, batch: PairBatch, split: str) -> ChosenRejectedOutputs:
        was_training = self.model.training
        self.model.eval()  # the cache is computed in eval mode; dropout must not differ
        adapters = self.model.disable_adapter() if self.adapters_off else contextlib.nullcontext()
        try:
            with torch.no_grad(), adapters:
                out = self.forward(self.model, batch)
        finally:
            self.model.train(was_training)
        return out


def check_token_counts(policy, reference, split: str) -> None:
    """A cache row must describe the same completions as the batch: their token counts must agree (pairs or
    ranked groups alike)."""
    if isinstance(policy, RankedOutputs) != isinstance(reference, RankedOutputs):
        raise DpokitError(
            f"split {split!r}: the reference cache holds {'ranked groups' if isinstance(reference, RankedOutputs) else 'pairs'} "
            "and the data the other; the cache was built from other data: rebuild it with `dpokit ref-logps`"
        )
    if isinstance(policy, RankedOutputs):
        same = (
            policy.tokens is None
            or reference.tokens is None
            or (policy.group_sizes == reference.group_sizes and torch.equal(policy.tokens, reference.tokens))
        )
    elif reference.chosen_tokens is None or policy.chosen_tokens is None:
        return
    else:
        same = torch.equal(policy.chosen_tokens, reference.chosen_tokens) and torch.equal(
            policy.rejected_tokens, reference.rejected_tokens
        )
    if not same:
        raise DpokitError(
            f"split {split!r}: completion token counts differ between the batch and the reference cache; "
            "the cache was built from other data: rebuild it with `dpokit ref-logps`"
        )
