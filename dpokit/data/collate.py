"""Batches of preference pairs as model inputs.

A batch of B pairs becomes 2B right-padded rows: rows ``0..B-1`` are prompt+chosen, rows ``B..2B-1``
prompt+rejected. ``completion_mask`` marks the tokens whose log-probs count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # [2B, T] long
    attention_mask: torch.Tensor  # [2B, T] long, 1 on real tokens
    completion_mask: torch.Tensor  # [2B, T] bool, True on completion tokens
    index: torch.Tensor  # [B] long, example index of each pair in its split

    @property
    def num_pairs(self) -> int:
        return int(self.index.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
            completion_mask=self.completion_mask.to(device, non_blocking=True),
            index=self.index.to(device, non_blocking=True),
        )


def pad_pairs(rows: Sequence[dict], indices: Sequence[int], pad_id: int) -> PairBatch:
    """Collate prepared rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) into a `PairBatch`."""
    sequences = []
    completion_starts = []
    for side in ("chosen_ids", "rejected_ids"):
        for row in rows:
            prompt = list(row["prompt_ids"])
            sequences.append(prompt + list(row[side]))
            completion_starts.append(len(prompt))
    width = max(len(s) for s in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (sequence, start) in enumerate(zip(sequences, completion_starts)):
        input_ids[i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[i, : len(sequence)] = 1
        completion_mask[i, start : len(sequence)] = True
    return PairBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        index=torch.tensor(list(indices), dtype=torch.long),
    )
