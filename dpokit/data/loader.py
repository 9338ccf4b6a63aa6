"""The training input pipeline: optimizer steps' batches, prepared ahead of the step that uses them.

`StepBatches` maps an optimizer step to this rank's collated micro-batches (rows read from the prepared
split, then `collate.collate_pairs` in the checked layout). `step_loader` wraps it in a `DataLoader` over
the steps still to run: with workers, the next steps are read and collated in other processes (and
pinned, on CUDA) while the current one trains. Which pairs a step holds comes from `PairSampler`
alone, so resuming at step k gives exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from dpokit.data.collate import collate_pairs
from dpokit.data.prepared import SCORE_COLUMNS, shape_columns
from dpokit.data.sampler import PairSampler
from dpokit.types import PairBatch


def example_rows(split, indices: list[int]) -> list[dict]:
    """Rows `indices` of a prepared split as dicts: a pair's `COLUMNS` (and `SCORE_COLUMNS` when it has them), or a
    ranked group's `RANKED_COLUMNS`."""
    names = shape_columns(
        "ranked" if "completion_ids" in split.column_names else "pairs", SCORE_COLUMNS[0] in split.column_names
    )
    columns = split[indices]
    return [{k: columns[k][i] for k in names} for i in range(len(indices))]


def collated(
    split, indices: list[int], pad_id: int, packing: bool, prefix_sharing: bool, pack_length: Optional[int]
) -> PairBatch:
    """The examples `indices` of a prepared split (pairs or ranked groups) as one batch in the given layout (on CPU)."""
    return collate_pairs(example_rows(split, indices), indices, pad_id, packing, prefix_sharing, pack_length)


class StepBatches(Dataset):
    """Optimizer step -> this rank's collated micro-batches for it."""

    def __init__(
        self, split, sampler: PairSampler, pad_id: int, packing: bool, prefix_sharing: bool, pack_length: Optional[int]
    ):
        self.split, self.sampler, self.pad_id = split, sampler, pad_id
        self.layout = (packing, prefix_sharing, pack_length)

    def __getitem__(self, step: int) -> list[PairBatch]:
        return [collated(self.split, indices, self.pad_id, *self.layout) for indices in self.sampler.step_indices(step)]


def default_workers(device: torch.device) -> int:
    """Loader processes when ``data.num_workers`` is not set: 2 on CUDA (the GPU should never wait for the
    CPU), none on CPU (the step already uses every core; collation runs in the training process)."""
    return 2 if device.type == "cuda" else 0


def step_loader(
    batches: StepBatches, first_step: int, last_step: int, num_workers: int, device: torch.device
) -> DataLoader:
    """The batches of steps ``first_step .. last_step - 1``, in order, `num_workers` steps' worth prepared ahead."""
    return DataLoader(
        batches,
        sampler=range(first_step, last_step),
        batch_size=None,  # an item is already a step's micro-batches
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if num_workers else None,
        persistent_workers=num_workers > 0,
        multiprocessing_context="spawn" if num_workers else None,  # fork is unsafe with the process group's threads
        # Every iterator draws its workers' base seed; from the global RNG it would shift the dropout masks of a
        # resumed run (its iterator starts at step k, the uninterrupted run's at step 0). Collation draws nothing.
        generator=torch.Generator().manual_seed(0),
    )
