"""The values every layer passes around: a batch of pairs, one model's outputs on it, a value range.

This module sits at the bottom of the house (docs/architecture.md): it imports nothing from dpokit
but `dpokit.errors`, so data, log-probs, losses, the reference and metrics can all depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from dpokit.errors import DpokitError


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # [R, L] long
    attention_mask: torch.Tensor  # [R, L] long padding mask, or [R, 1, L, L] bool (True: may attend)
    target_rows: torch.Tensor  # [M] long, one entry per completion token in the batch
    target_cols: torch.Tensor  # [M] long, column whose hidden state predicts the token
    target_ids: torch.Tensor  # [M] long
    target_slots: torch.Tensor  # [M] long, 0..B-1 chosen, B..2B-1 rejected
    index: torch.Tensor  # [B] long, example index of each pair in its split
    num_tokens: int  # tokens the model computes (padding excluded)
    position_ids: Optional[torch.Tensor] = None  # [R, L]; None: 0..L-1 in every row
    completion_mask: Optional[torch.Tensor] = None  # [R, L] bool, padded layout only
    token_mask: Optional[torch.Tensor] = None  # [R, L] long, 1 on real tokens (0 on padding)

    @property
    def num_pairs(self) -> int:
        return int(self.index.numel())

    def to(self, device: torch.device | str) -> "PairBatch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return PairBatch(**moved)


@dataclass
class ChosenRejectedOutputs:
    """Per-pair outputs of one model (policy or reference) on a batch of pairs; each field ``[B]``.

    ``chosen_logits``/``rejected_logits`` are the mean logit over completion positions and
    vocabulary (a detached diagnostic: dpokit never materialises full ``[B, T, V]`` logits).
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_logits: Optional[Tensor] = None
    rejected_logits: Optional[Tensor] = None
    chosen_tokens: Optional[Tensor] = None
    rejected_tokens: Optional[Tensor] = None
    router_aux_loss: Optional[Tensor] = None  # scalar: a mixture-of-experts policy's load-balancing term

    def average_logps(self) -> tuple[Tensor, Tensor]:
        """Length-normalised log-probs (sum over completion tokens / their count)."""
        if self.chosen_tokens is None or self.rejected_tokens is None:
            raise DpokitError("this loss needs completion token counts (chosen_tokens/rejected_tokens)")
        return (
            self.chosen_logps / self.chosen_tokens.clamp(min=1).to(self.chosen_logps.dtype),
            self.rejected_logps / self.rejected_tokens.clamp(min=1).to(self.rejected_logps.dtype),
        )


@dataclass(frozen=True)
class Range:
    """Allowed values ``low (<|<=) value (<|<=) high``; either end may be open-ended (None)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_inclusive: bool = True
    high_inclusive: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value >= self.low if self.low_inclusive else value > self.low)
        below = self.high is None or (value <= self.high if self.high_inclusive else value < self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>=' if self.low_inclusive else '>'} {self.low:g}"
        left, right = "[" if self.low_inclusive else "(", "]" if self.high_inclusive else ")"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
ABOVE_0 = Range(0, low_inclusive=False)
UNIT = Range(0, 1)  # [0, 1)


@dataclass
class TrainResult:
    """What a training recipe's ``main(argv)`` returns (on the main rank): the run and its last metrics."""

    run_dir: Path
    steps: int  # optimizer steps the run has done
    checkpoint: Optional[Path]  # the final checkpoint
    train: dict[str, float] = field(default_factory=dict)  # the last step's metrics
    eval: dict[str, float] = field(default_factory=dict)  # the final eval (empty without an eval split)
    eval_at_start: dict[str, float] = field(default_factory=dict)  # before any update (training.eval_at_start)
