"""The packed layouts' attention from O(L) segments (`dpokit.attention`) equals the dense mask it replaces.

Kernel level in float64 (values and gradients against SDPA over `dense_mask`, sliding windows by position,
grouped-query heads), model level on long rows (several pairs packed, windows shorter than the prompt)
against the padded layout and ``model(ids).logits``, and the memory claim: no tensor of ``L×L`` elements
is built anywhere in a packed forward or backward.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import families
import pytest
import torch
import torch.nn.functional as F
from test_families import LAYOUTS, ROWS, own_logps
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from dpokit import attention
from dpokit.attention import LayoutAttention, layout_attention
from dpokit.data.collate import collate_pairs, dense_mask, pad_pairs
from dpokit.logps import concatenated_forward, naive_sequence_logps, sequence_logps


def random_rows(n: int, prompt: tuple[int, int], completion: tuple[int, int], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def ids(low, high):
        return [rng.randrange(10, 300) for _ in range(rng.randint(low, high))]

    return [
        {"prompt_ids": ids(*prompt), "chosen_ids": ids(*completion), "rejected_ids": ids(*completion)} for _ in range(n)
    ]


def dense_reference(query, key, value, batch, window):
    """SDPA over the dense ``[R, 1, L, L]`` mask the segments mean, windowed by position."""
    mask = dense_mask(batch)
    if window is not None:
        positions = batch.position_ids
        mask = mask & ((positions[:, :, None] - positions[:, None, :]) < window).unsqueeze(1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_layout_attention_equals_the_dense_mask_in_float64(window, prefix_sharing):
    check_against_the_dense_mask(window, prefix_sharing)


def test_the_rejected_branch_without_the_merged_kernel_equals_the_dense_mask(monkeypatch):
    # float16 on CPU (no CPU flash kernel) and attention dropout: one causal call over prompt + rejected instead.
    monkeypatch.setattr(attention, "MERGED_DTYPES", ())
    check_against_the_dense_mask(None, True)


def check_against_the_dense_mask(window, prefix_sharing):
    rows = random_rows(5, prompt=(3, 30), completion=(1, 25), seed=1)
    batch = collate_pairs(rows, list(range(5)), 0, packing=True, prefix_sharing=prefix_sharing, pack_length=90)
    r, length = batch.input_ids.shape
    assert r > 1 and len(batch.segments) > r  # several segments per row
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(r, 4, length, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    key = torch.randn(r, 2, length, 8, dtype=torch.float64, generator=generator, requires_grad=True)  # grouped
    value = torch.randn(r, 2, length, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    layout = LayoutAttention(batch.segments, length, r, (window,))
    real = batch.token_mask.bool()[..., None, None]  # padding outputs are never read
    got = layout_attention(SimpleNamespace(layer_idx=0), query, key, value, layout, "sdpa") * real
    expected = dense_reference(query, key, value, batch, window) * real
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    upstream = torch.randn(got.shape, dtype=torch.float64, generator=generator)
    grads = torch.autograd.grad((got * upstream).sum(), (query, key, value))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (query, key, value))
    for name, g, e in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=0, msg=f"d{name}")


LONG_ROWS = random_rows(4, prompt=(100, 130), completion=(50, 100), seed=2)  # prompts far longer than the window


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3_text"])
def test_long_packed_rows_equal_the_padded_layout_and_the_models_own_logits(family, family_dirs):
    # Mistral slides every layer, Gemma 2 soft-caps attention scores (eager) and mixes windows, Gemma 3 mixes
    # sliding and full layers; every window (5 tokens) is far shorter than the prompts.
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32).eval()
    indices = list(range(len(LONG_ROWS)))
    padded = pad_pairs(LONG_ROWS, indices, pad_id=0)
    packed = collate_pairs(LONG_ROWS, indices, 0, packing=True, prefix_sharing=True, pack_length=1400)
    assert packed.input_ids.shape[0] == 1 and len(packed.segments) == 4  # all four pairs in one row
    with torch.no_grad():
        own = naive_sequence_logps(model, padded.input_ids, padded.attention_mask, padded.completion_mask)
        padded_logps = sequence_logps(model, padded)[0]
        packed_logps = sequence_logps(model, packed)[0]
    torch.testing.assert_close(padded_logps, own, atol=2e-3, rtol=0)
    torch.testing.assert_close(packed_logps, own, atol=2e-3, rtol=0)
    torch.testing.assert_close(packed_logps, padded_logps, atol=2e-3, rtol=0)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.largest:
                self.largest, self.op = tensor.numel(), func
        return out


def test_no_tensor_of_row_length_squared_in_a_packed_forward_and_backward(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = random_rows(2, prompt=(700, 700), completion=(400, 450), seed=3)
    batch = collate_pairs(rows, [0, 1], 0, packing=True, prefix_sharing=True, pack_length=4000)
    length = batch.input_ids.shape[1]
    assert batch.input_ids.shape[0] == 1 and length > 3000
    with LargestTensor() as largest:
        out = concatenated_forward(model, batch)
        (out.chosen_logps - out.rejected_logps).sum().backward()
    # The dense path's mask alone is length² (9M) elements; the layout's largest tensor is a chunk of logits
    # or a projection's output, under a million.
    assert largest.largest < length * length // 8, (largest.largest, largest.op)


@pytest.mark.slow
def test_flex_attention_block_mask_gives_the_padded_logps_on_cpu(family_dirs):
    # FlexAttention's backward does not run on CPU (torch 2.13): its forward is what is checked here, on Mistral
    # (grouped heads, every layer sliding by a window shorter than the pairs).
    model = AutoModelForCausalLM.from_pretrained(
        family_dirs["mistral"], dtype=torch.float32, attn_implementation="flex_attention"
    ).eval()
    rows = random_rows(4, prompt=(4, 40), completion=(3, 30), seed=4)
    indices = list(range(len(rows)))
    padded = pad_pairs(rows, indices, pad_id=0)
    with torch.no_grad():
        own = naive_sequence_logps(model, padded.input_ids, padded.attention_mask, padded.completion_mask)
        packed = collate_pairs(rows, indices, 0, packing=True, prefix_sharing=True, pack_length=160)
        assert len(packed.segments) > packed.input_ids.shape[0]  # several pairs in a row
        torch.testing.assert_close(sequence_logps(model, packed)[0], own, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", [name for name in families.FAMILIES if name not in families.PADDED_ONLY])
def test_every_family_gives_its_own_logps_through_the_layout_attention(family, family_dirs, monkeypatch):
    # Short rows normally keep the dense mask (`DENSE_MAX_WIDTH`); here every packed row takes the layout kernels.
    # (tests/test_families.py covers training mode and the policy as `load_policy` builds it on the same rows.)
    monkeypatch.setattr(attention, "DENSE_MAX_WIDTH", 0)
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32)
    expected = own_logps(model)
    for name in ("packed", "packed_prefix"):
        layout = LAYOUTS[name]
        batch = collate_pairs(ROWS, list(range(len(ROWS))), 0, layout.packing, layout.prefix_sharing, pack_length=64)
        assert len(batch.segments) > batch.input_ids.shape[0]  # several segments in a row
        logps = sequence_logps(model, batch)[0]  # autograd on
        assert logps.requires_grad
        torch.testing.assert_close(logps.detach(), expected, atol=1e-4, rtol=0, msg=f"{family}, {name} layout")


def test_layout_attention_gradients_equal_the_models_own(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(attention, "DENSE_MAX_WIDTH", 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows, indices = LONG_ROWS[:2], [0, 1]
    out = concatenated_forward(
        model, collate_pairs(rows, indices, 0, packing=True, prefix_sharing=True, pack_length=700)
    )
    (out.chosen_logps - 0.5 * out.rejected_logps).sum().backward()
    layout_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    padded = pad_pairs(rows, indices, pad_id=0)
    own = naive_sequence_logps(model, padded.input_ids, padded.attention_mask, padded.completion_mask)
    (own[:2] - 0.5 * own[2:]).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(layout_grads[name], param.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_start_up_check_runs_the_layout_kernels_that_long_rows_will_use(family_dirs, monkeypatch):
    # The check's pairs are short (the dense mask's range), but training rows may be long: a kernel that does not
    # reproduce the family (here one that forgets the prompt for the rejected tokens) must send it to padded.
    from dpokit.fidelity import PADDED, check_layout

    model = AutoModelForCausalLM.from_pretrained(family_dirs["llama"], dtype=torch.float32)
    notes = []
    assert check_layout(model, ROWS, 0, LAYOUTS["packed_prefix"], announce=notes.append) == LAYOUTS["packed_prefix"]
    assert notes == []
    real = attention.causal_problem

    def without_prompt(query, key, value, prefix, *args):
        return real(query, key[:, :, prefix:], value[:, :, prefix:], 0, *args[:3])  # and no prefix queries

    monkeypatch.setattr(attention, "causal_problem", without_prompt)
    assert check_layout(model, ROWS, 0, LAYOUTS["packed_prefix"], announce=notes.append) == PADDED
    assert len(notes) == 1 and "padded" in notes[0]
