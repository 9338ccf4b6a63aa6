"""Deterministic, resumable order of training pairs, the same for any number of processes.

Each epoch is a seeded permutation of the split cut into *global batches* of
``batch_size x world_size x accumulation`` pairs (the incomplete tail is left out of that epoch, so
every step sees the same number of pairs). Micro-step ``m`` of a global batch is a contiguous slice
of it, and rank ``r`` takes the ``r``-th ``batch_size`` pairs of that slice: a 2-process run with
batch 2 sees, step by step, exactly the pairs a 1-process run with batch 4 sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class SamplerState:
    epoch: int = 0
    step_in_epoch: int = 0  # global batches already consumed in `epoch`


class PairSampler:
    """Yields, per optimizer step, this rank's example indices for each micro-step."""

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        accumulation_steps: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        lengths: Optional[Sequence[int]] = None,
    ):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.accumulation_steps = accumulation_steps
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        self.state = SamplerState()
        self._cached_epoch: Optional[int] = None
        self._cached_order: Optional[torch.Tensor] = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size * self.accumulation_steps

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """All example indices of `epoch`, in order, global batch after global batch."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = (
            torch.randperm(self.num_examples, generator=generator) if self.shuffle else torch.arange(self.num_examples)
        )
        if self.lengths is None:
            return order
        return self._grouped_by_length(order, generator)

    def _grouped_by_length(self, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Sort within windows of 64 global batches, then shuffle whole global batches (seeded)."""
        g = self.global_batch_size
        window = 64 * g
        pieces = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            pieces.append(chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)])
        grouped = torch.cat(pieces)
        usable = (len(grouped) // g) * g
        batches = grouped[:usable].view(-1, g)
        if self.shuffle:
            batches = batches[torch.randperm(len(batches), generator=generator)]
        return torch.cat([batches.reshape(-1), grouped[usable:]])

    def micro_batches(self, global_batch: torch.Tensor) -> list[list[int]]:
        """This rank's indices for each micro-step of one global batch."""
        per_micro = self.batch_size * self.world_size
        out = []
        for m in range(self.accumulation_steps):
            micro = global_batch[m * per_micro : (m + 1) * per_micro]
            out.append(micro[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist())
        return out

    @property
    def steps_done(self) -> int:
        """Optimizer steps consumed so far, over all epochs."""
        return self.state.epoch * self.steps_per_epoch + self.state.step_in_epoch

    def advance(self) -> None:
        """Count one optimizer step as consumed (what `state_dict` records for resume)."""
        if self.state.step_in_epoch >= self.steps_per_epoch:
            self.state = SamplerState(epoch=self.state.epoch + 1, step_in_epoch=0)
        self.state.step_in_epoch += 1

    def step_indices(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of indices for optimizer step `step` (counted from the run's start), without
        changing the state: a loader can prepare steps ahead of the ones consumed."""
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.num_examples} examples make no global batch of {self.global_batch_size} pairs")
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if self._cached_epoch != epoch:  # one permutation per epoch, not one per step
            self._cached_epoch, self._cached_order = epoch, self.epoch_order(epoch)
        g = self.global_batch_size
        return self.micro_batches(self._cached_order[step_in_epoch * g : (step_in_epoch + 1) * g])

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "step_in_epoch": self.state.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.state = SamplerState(epoch=int(state["epoch"]), step_in_epoch=int(state["step_in_epoch"]))
