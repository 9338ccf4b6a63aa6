"""Batches of preference pairs as model inputs, in three layouts that give the same log-probs.

- **padded** (`pad_pairs`): 2B right-padded rows, ``0..B-1`` prompt+chosen and ``B..2B-1``
  prompt+rejected; a plain 2-D padding mask, so the model uses its ordinary causal attention.
- **packed** (``packing=True``): the same sequences laid end to end in fewer rows with no padding
  between them; attention stays within each sequence and position ids restart at 0 for each.
- **prefix-shared** (``prefix_sharing=True``): one segment per pair, ``[prompt, chosen, rejected]``;
  the prompt is computed once, rejected tokens attend to the prompt but not to chosen, and their
  positions continue from the prompt's end. Combines with packing.

The packed layouts carry who-attends-to-whom as O(L) metadata (`PairBatch.segments`), which
`dpokit.attention` turns into kernel calls; no ``[L, L]`` mask is built. `dense_mask` builds the mask
those segments mean, to check and benchmark against.

Padding at the end of a packed or prefix-shared row holds the row's first token, not the pad id. Its columns
belong to no segment: they attend to no real token and no real token attends to them, and no output is read
from them. A pad id whose embedding row is zero (``padding_idx``) would stay exactly zero through a bias-free
model there, and a norm without an epsilon (Gemma 3n's ``mean(h**2) ** 0.5``) has an infinite derivative at
zero: the gradient of every parameter would be NaN although the forward is right. A real token keeps those
columns' hidden states away from zero. (In the padded layout padding attends to the real tokens before it.)

Every layout lists, for each completion token, the row and column of the hidden state that predicts
it (`target_rows`, `target_cols`), the token (`target_ids`) and the output it counts toward
(`target_slots`: ``i`` for pair i's chosen, ``B+i`` for its rejected). `dpokit.logps` needs nothing else.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from dpokit.types import PairBatch, Segment

PROMPT = 0  # the shared branch of a segment; 1 and 2 are its first and second (`dpokit.attention.segment_columns`)


def pad_pairs(rows: Sequence[dict], indices: Sequence[int], pad_id: int) -> PairBatch:
    """Collate prepared rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) into the padded layout."""
    sequences, starts = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for row in rows:
            prompt = list(row["prompt_ids"])
            sequences.append(prompt + list(row[side]))
            starts.append(len(prompt))
    width = max(len(s) for s in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (sequence, start) in enumerate(zip(sequences, starts)):
        input_ids[i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[i, : len(sequence)] = 1
        completion_mask[i, start : len(sequence)] = True
    # Row s, column t is a completion token predicted by column t-1 of the same row; slot = row.
    target_rows, target_cols = completion_mask[:, 1:].nonzero(as_tuple=True)
    return PairBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        target_rows=target_rows,
        target_cols=target_cols,
        target_ids=input_ids[target_rows, target_cols + 1],
        target_slots=target_rows.clone(),
        index=torch.tensor(list(indices), dtype=torch.long),
        num_tokens=int(attention_mask.sum()),
        completion_mask=completion_mask,
        token_mask=attention_mask,
        slot_counts=tuple(completion_mask[:, 1:].sum(1).tolist()),  # slot = row
    )


@dataclass
class _Segment:
    """One attention-isolated piece of a row: tokens, their positions and branches, and its targets."""

    tokens: list[int]
    positions: list[int]
    parts: tuple[int, int, int]  # shared, first, second (`dpokit.types.Segment`)
    targets: list[tuple[int, int, int]]  # (column within the segment, token id, slot)


def _sequence_segment(prompt: list[int], completion: list[int], slot: int) -> _Segment:
    tokens = prompt + completion
    p = len(prompt)
    return _Segment(
        tokens=tokens,
        positions=list(range(len(tokens))),
        parts=(len(tokens), 0, 0),
        targets=[(p + j - 1, token, slot) for j, token in enumerate(completion)],
    )


def _prefix_shared_segment(
    prompt: list[int], chosen: list[int], rejected: list[int], pair: int, num_pairs: int
) -> _Segment:
    p, c = len(prompt), len(chosen)
    targets = [(p + j - 1, token, pair) for j, token in enumerate(chosen)]
    # Rejected token j is predicted by the last prompt token (j = 0) or by rejected token j-1.
    targets += [(p - 1 if j == 0 else p + c + j - 1, token, num_pairs + pair) for j, token in enumerate(rejected)]
    return _Segment(
        tokens=prompt + chosen + rejected,
        positions=list(range(p + c)) + list(range(p, p + len(rejected))),
        parts=(p, c, len(rejected)),
        targets=targets,
    )


def _pack(segments: list[_Segment], capacity: int) -> list[list[_Segment]]:
    """First-fit decreasing: rows of at most `capacity` tokens (a longer segment gets a row alone)."""
    rows: list[list[_Segment]] = []
    room: list[int] = []
    for segment in sorted(segments, key=lambda s: len(s.tokens), reverse=True):
        size = len(segment.tokens)
        for r, free in enumerate(room):
            if size <= free:
                rows[r].append(segment)
                room[r] -= size
                break
        else:
            rows.append([segment])
            room.append(capacity - size)
    return rows


def collate_pairs(
    rows: Sequence[dict],
    indices: Sequence[int],
    pad_id: int,
    packing: bool = False,
    prefix_sharing: bool = False,
    pack_length: Optional[int] = None,
) -> PairBatch:
    """Collate pairs into the layout the flags ask for (plain `pad_pairs` when both are off).

    Args:
        pack_length: row capacity when packing; default the longest segment, so no row is longer
            than the padded layout's would be.
    """
    if not packing and not prefix_sharing:
        return pad_pairs(rows, indices, pad_id)
    b = len(rows)
    segments: list[_Segment] = []
    for i, row in enumerate(rows):
        prompt, chosen, rejected = list(row["prompt_ids"]), list(row["chosen_ids"]), list(row["rejected_ids"])
        if prefix_sharing:
            segments.append(_prefix_shared_segment(prompt, chosen, rejected, i, b))
        else:
            segments += [_sequence_segment(prompt, chosen, i), _sequence_segment(prompt, rejected, b + i)]
    longest = max(len(s.tokens) for s in segments)
    layout = _pack(segments, max(pack_length or 0, longest)) if packing else [[s] for s in segments]
    width = max(sum(len(s.tokens) for s in row) for row in layout)
    r = len(layout)
    input_ids = torch.full((r, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((r, width), dtype=torch.long)
    token_mask = torch.zeros((r, width), dtype=torch.long)
    spans: list[Segment] = []
    targets: list[tuple[int, int, int, int]] = []
    for row_index, row in enumerate(layout):
        offset = 0
        for segment in row:
            n = len(segment.tokens)
            span = slice(offset, offset + n)
            input_ids[row_index, span] = torch.tensor(segment.tokens)
            position_ids[row_index, span] = torch.tensor(segment.positions)
            token_mask[row_index, span] = 1
            spans.append(Segment(row_index, offset, *segment.parts))
            targets += [(row_index, offset + col, token, slot) for col, token, slot in segment.targets]
            offset += n
        input_ids[row_index, offset:] = input_ids[row_index, 0]  # padding: a real token (see the module docstring)
    target = torch.tensor(targets, dtype=torch.long)  # [M, 4]
    per_slot = Counter(slot for *_, slot in targets)
    return PairBatch(
        input_ids=input_ids,
        attention_mask=token_mask,
        target_rows=target[:, 0],
        target_cols=target[:, 1],
        target_ids=target[:, 2],
        target_slots=target[:, 3],
        index=torch.tensor(list(indices), dtype=torch.long),
        num_tokens=int(token_mask.sum()),
        position_ids=position_ids,
        token_mask=token_mask,
        segments=tuple(spans),
        slot_counts=tuple(per_slot[s] for s in range(2 * b)),
    )


def dense_mask(batch: PairBatch) -> torch.Tensor:
    """``[R, 1, L, L]`` bool: the mask a packed batch's segments mean (`block_causal_mask`), built on demand
    to check the layout attention against and to benchmark the dense path; training never builds it."""
    from dpokit.attention import segment_columns

    rows, width = batch.input_ids.shape
    segment_ids, branches, _ = segment_columns(batch.segments or (), rows, width)
    return block_causal_mask(segment_ids, branches)


def block_causal_mask(segment_ids: torch.Tensor, branches: torch.Tensor) -> torch.Tensor:
    """``[R, 1, L, L]`` bool: query q may attend key k if both are in one segment, k is not after q,
    and k is shared prompt or on q's own branch. Padding attends only to itself (no empty rows)."""
    length = segment_ids.shape[1]
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    key_branch, query_branch = branches[:, None, :], branches[:, :, None]
    visible_branch = (key_branch == PROMPT) | (key_branch == query_branch)
    real = (segment_ids >= 0)[:, :, None]
    mask = same_segment & causal & visible_branch & real
    mask |= torch.eye(length, dtype=torch.bool) & ~real
    return mask.unsqueeze(1)
