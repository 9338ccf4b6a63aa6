"""Ranked groups in every layout: one prompt, k completions behind it, each completion's log-probs the model's own.

A group of k completions is one segment ``[prompt, c_1, ..., c_k]`` in the prefix-shared layout (the pair is
the k = 2 case): each completion attends to the prompt and itself only, at positions continuing from the
prompt's end. For every family dpokit trains packed, in every layout and with both kernels (the dense mask of
short rows and the O(L) layout attention of long ones), the per-completion log-probs equal ``model(ids).logits``
on each ``prompt + completion`` alone; gradients equal the padded layout's.
"""

from __future__ import annotations

import contextlib
import random

import families
import pytest
import torch
from test_attention import dense_reference
from test_families import LAYOUTS, layouts_of
from transformers import AutoModelForCausalLM

from dpokit.attention import LayoutAttention, kernels_at_every_width, layout_attention
from dpokit.data.collate import collate_pairs, dense_mask, pad_pairs
from dpokit.logps import concatenated_forward, naive_sequence_logps, sequence_logps
from dpokit.types import RankedOutputs


def ranked_rows(sizes=(2, 4, 3, 5), seed: int = 0, prompt=(4, 12), completion=(3, 12)) -> list[dict]:
    """Ranked groups of the given sizes, longer than the families' test window (5 tokens)."""
    rng = random.Random(seed)

    def ids(low, high):
        return [rng.randrange(10, 300) for _ in range(rng.randint(low, high))]

    return [
        {
            "prompt_ids": ids(*prompt),
            "completion_ids": [ids(*completion) for _ in range(k)],
            "scores": [float(rng.randint(0, 3)) for _ in range(k)],
        }
        for k in sizes
    ]


ROWS = ranked_rows()


def own_logps(model, rows=ROWS) -> torch.Tensor:
    """Each completion's log-prob from the model's own forward on ``prompt + completion`` (full logits, eval)."""
    batch = pad_pairs(rows, list(range(len(rows))), pad_id=0)
    model.eval()
    with torch.no_grad():
        return naive_sequence_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)


def test_a_ranked_batch_numbers_completions_group_by_group_with_their_scores():
    rows = ranked_rows((3, 2))
    batch = collate_pairs(rows, [7, 9], 0, packing=True, prefix_sharing=True)
    assert batch.group_sizes == (3, 2) and batch.num_outputs == 5 and batch.num_pairs == 2
    assert list(batch.scores) == rows[0]["scores"] + rows[1]["scores"]
    assert batch.slot_counts == tuple(len(c) for row in rows for c in row["completion_ids"])
    segment = [s for s in batch.segments if s.shared == len(rows[0]["prompt_ids"])][0]
    assert segment.branches == tuple(len(c) for c in rows[0]["completion_ids"])
    # Every branch's positions continue from the prompt's end.
    p = segment.shared
    for first, size in zip(segment.branch_starts(), segment.branches):
        assert batch.position_ids[segment.row, first : first + size].tolist() == list(range(p, p + size))


def test_each_completion_sees_the_prompt_and_itself_only():
    rows = ranked_rows((3,))
    batch = collate_pairs(rows, [0], 0, prefix_sharing=True)
    (segment,) = batch.segments
    mask = dense_mask(batch)[0, 0]
    starts = segment.branch_starts()
    for b, (first, size) in enumerate(zip(starts, segment.branches)):
        for other, (o_first, o_size) in enumerate(zip(starts, segment.branches)):
            block = mask[first : first + size, o_first : o_first + o_size]
            if other == b:
                assert torch.equal(block, torch.ones(size, size, dtype=torch.bool).tril())
            else:
                assert not block.any()
        assert mask[first : first + size, : segment.shared].all()


@pytest.mark.parametrize("window", [None, 7])
def test_ranked_layout_attention_equals_the_dense_mask_in_float64(window):
    rows = ranked_rows((4, 2, 3), prompt=(5, 30), completion=(3, 25))
    batch = collate_pairs(rows, [0, 1, 2], 0, packing=True, prefix_sharing=True, pack_length=200)
    torch.manual_seed(0)
    r, width = batch.input_ids.shape
    query = torch.randn(r, 4, width, 8, dtype=torch.float64, requires_grad=True)
    key = torch.randn(r, 2, width, 8, dtype=torch.float64, requires_grad=True)
    value = torch.randn(r, 2, width, 8, dtype=torch.float64, requires_grad=True)
    layout = LayoutAttention(batch.segments, width, r, (window,))
    module = type("Layer", (), {"layer_idx": 0})()
    out = layout_attention(module, query, key, value, layout, "sdpa")
    expected = dense_reference(query, key, value, batch, window)
    real = batch.token_mask.bool()
    torch.testing.assert_close(out[real], expected[real])
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out[real] * weights[real]).sum(), (query, key, value))
    expected_grads = torch.autograd.grad((expected[real] * weights[real]).sum(), (query, key, value))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_every_layout_gives_each_completions_own_logps_for_every_family(family, family_dirs):
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32)
    expected = own_logps(model)
    for name, layout in layouts_of(family).items():
        widths = [contextlib.nullcontext()] + ([kernels_at_every_width()] if layout.packing else [])
        for width in widths:  # the dense mask (short rows), then the layout kernels (long rows)
            with width:
                batch = collate_pairs(ROWS, list(range(len(ROWS))), 0, layout.packing, layout.prefix_sharing)
                out = concatenated_forward(model.eval(), batch)
            assert isinstance(out, RankedOutputs) and out.group_sizes == (2, 4, 3, 5)
            torch.testing.assert_close(out.logps, expected, atol=1e-4, rtol=0, msg=f"{family}, {name} layout")
            assert out.tokens.tolist() == [len(c) for row in ROWS for c in row["completion_ids"]]


def test_ranked_gradients_equal_the_padded_layouts(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = ranked_rows((4, 3), prompt=(20, 40), completion=(10, 30), seed=3)
    weights = torch.linspace(-1, 1, 7)
    grads = []
    for layout in (LAYOUTS["padded"], LAYOUTS["packed_prefix"]):
        model.zero_grad()
        with kernels_at_every_width():
            batch = collate_pairs(rows, [0, 1], 0, layout.packing, layout.prefix_sharing)
            (sequence_logps(model, batch)[0] * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)
