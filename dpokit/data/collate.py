"""Batches of preference pairs or ranked groups as model inputs, in three layouts that give the same log-probs.

- **padded** (`pad_pairs`): one right-padded row per completion: for B pairs ``0..B-1`` prompt+chosen and
  ``B..2B-1`` prompt+rejected, for ranked groups prompt+completion in slot order; a plain 2-D padding
  mask, so the model uses its ordinary causal attention.
- **packed** (``packing=True``): the same sequences laid end to end in fewer rows with no padding
  between them; attention stays within each sequence and position ids restart at 0 for each.
- **prefix-shared** (``prefix_sharing=True``): one segment per example, ``[prompt, chosen, rejected]`` for a
  pair and ``[prompt, completion_1, ..., completion_k]`` for a ranked group; the prompt is computed once, each
  completion attends to the prompt and itself but no other completion, and every completion's positions
  continue from the prompt's end. Combines with packing.

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
(`target_slots`: ``i`` for pair i's chosen, ``B+i`` for its rejected; a ranked group's completions at consecutive
slots after the groups before it). `dpokit.logps` needs nothing else.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from dpokit.data.prepared import SCORE_COLUMNS
from dpokit.types import PairBatch, Segment

PROMPT = 0  # the shared part of a segment; its branches are 1, 2, ... (`dpokit.attention.segment_columns`)


def example_completions(rows: Sequence[dict]) -> tuple[list[list[int]], list[list[list[int]]], list[list[int]]]:
    """Each example's prompt, its completions and their output slots: a pair's ``[chosen, rejected]`` at slots
    ``[i, B+i]``, a ranked group's k completions (``completion_ids``) at consecutive slots after the groups before it."""
    prompts, completions, slots = [], [], []
    b, next_slot = len(rows), 0
    for i, row in enumerate(rows):
        prompts.append(list(row["prompt_ids"]))
        if "completion_ids" in row:
            group = [list(c) for c in row["completion_ids"]]
            completions.append(group)
            slots.append(list(range(next_slot, next_slot + len(group))))
            next_slot += len(group)
        else:
            completions.append([list(row["chosen_ids"]), list(row["rejected_ids"])])
            slots.append([i, b + i])
    return prompts, completions, slots


def _score_fields(rows: Sequence[dict]) -> dict:
    """`PairBatch.group_sizes` and ``scores`` of ranked rows; ``scores`` of pairs with scores (``chosen_score``,
    ``rejected_score``), in slot order: every chosen one, then every rejected one; nothing for pairs without."""
    if not rows:
        return {}
    if "completion_ids" in rows[0]:
        return dict(
            group_sizes=tuple(len(row["completion_ids"]) for row in rows),
            scores=tuple(float(score) for row in rows for score in row["scores"]),
        )
    if "chosen_score" in rows[0]:
        return dict(scores=tuple(float(row[column]) for column in SCORE_COLUMNS for row in rows))
    return {}


def pad_pairs(rows: Sequence[dict], indices: Sequence[int], pad_id: int) -> PairBatch:
    """Collate prepared rows into the padded layout: one right-padded row per completion, in slot order (a pair's
    ``prompt_ids + chosen_ids`` at row i and ``prompt_ids + rejected_ids`` at row B+i; a ranked group's
    ``prompt_ids + completion_ids[j]`` at its slots)."""
    prompts, completions, slots = example_completions(rows)
    by_slot = sorted(
        (slot, prompt, completion)
        for prompt, group, group_slots in zip(prompts, completions, slots)
        for slot, completion in zip(group_slots, group)
    )
    sequences = [prompt + completion for _, prompt, completion in by_slot]
    starts = [len(prompt) for _, prompt, _ in by_slot]
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
        **_score_fields(rows),
    )


@dataclass
class _Segment:
    """One attention-isolated piece of a row: tokens, their positions and branches, and its targets."""

    tokens: list[int]
    positions: list[int]
    shared: int
    branches: tuple[int, ...]  # `dpokit.types.Segment`
    targets: list[tuple[int, int, int]]  # (column within the segment, token id, slot)


def _sequence_segment(prompt: list[int], completion: list[int], slot: int) -> _Segment:
    tokens = prompt + completion
    p = len(prompt)
    return _Segment(
        tokens=tokens,
        positions=list(range(len(tokens))),
        shared=len(tokens),
        branches=(),
        targets=[(p + j - 1, token, slot) for j, token in enumerate(completion)],
    )


def _prefix_shared_segment(prompt: list[int], completions: list[list[int]], slots: list[int]) -> _Segment:
    """``[prompt, completion_1, ..., completion_k]``: each completion a branch behind the one prompt."""
    p = len(prompt)
    tokens, positions, targets = list(prompt), list(range(p)), []
    for completion, slot in zip(completions, slots):
        first = len(tokens)  # the branch's first column
        # Branch token j is predicted by the last prompt token (j = 0) or by the branch's token j-1.
        targets += [(p - 1 if j == 0 else first + j - 1, token, slot) for j, token in enumerate(completion)]
        tokens += completion
        positions += range(p, p + len(completion))
    return _Segment(tokens, positions, p, tuple(len(c) for c in completions), targets)


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
    """Collate pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, and ``chosen_score``, ``rejected_score`` when
    the data has scores) or ranked groups (``prompt_ids``, ``completion_ids``, ``scores``) into the layout the flags
    ask for (plain `pad_pairs` when both are off).

    Args:
        pack_length: row capacity when packing; default the longest segment, so no row is longer
            than the padded layout's would be.
    """
    if not packing and not prefix_sharing:
        return pad_pairs(rows, indices, pad_id)
    segments: list[_Segment] = []
    prompts, completions, slots = example_completions(rows)
    for prompt, group, group_slots in zip(prompts, completions, slots):
        if prefix_sharing:
            segments.append(_prefix_shared_segment(prompt, group, group_slots))
        else:
            segments += [_sequence_segment(prompt, c, slot) for c, slot in zip(group, group_slots)]
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
            spans.append(Segment(row_index, offset, segment.shared, segment.branches))
            targets += [(row_index, offset + col, token, slot) for col, token, slot in segment.targets]
            offset += n
        input_ids[row_index, offset:] = input_ids[row_index, 0]  # padding: a real token (see the module docstring)
    target = torch.tensor(targets, dtype=torch.long)  # [M, 4]
    per_slot = Counter(slot for *_, slot in targets)
    outputs = sum(len(group) for group in completions)
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
        slot_counts=tuple(per_slot[s] for s in range(outputs)),
        **_score_fields(rows),
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
