"""The one log-prob function equals the plain full-logits computation, in every batch layout,
values and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import naive_token_values
from transformers import AutoModelForCausalLM

from dpokit.data.collate import collate_pairs, dense_mask, pad_pairs
from dpokit.logps import concatenated_forward, naive_sequence_logps, sequence_logps
from dpokit.types import Segment

ROWS = [
    {"prompt_ids": [3, 40, 41, 42, 5, 4], "chosen_ids": [50, 51, 52, 5], "rejected_ids": [60, 5]},
    {"prompt_ids": [3, 43, 5, 4], "chosen_ids": [53, 54, 55, 56, 57, 5], "rejected_ids": [61, 62, 5]},
    {"prompt_ids": [3, 44, 45, 5, 4], "chosen_ids": [58, 5], "rejected_ids": [63, 64, 65, 66, 67, 68, 5]},
]
LAYOUTS = {
    "padded": dict(packing=False, prefix_sharing=False),
    "packed": dict(packing=True, prefix_sharing=False),
    "prefix": dict(packing=False, prefix_sharing=True),
    "packed_prefix": dict(packing=True, prefix_sharing=True),
    "packed_prefix_wide": dict(packing=True, prefix_sharing=True, pack_length=64),
}


@pytest.fixture(params=["sdpa", "eager"])
def model(tiny_model_dir, request):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=request.param)


def naive(model):
    batch = pad_pairs(ROWS, [0, 1, 2], pad_id=0)
    return naive_sequence_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_chunked_logps_equal_full_logits(model, chunk_size):
    batch = pad_pairs(ROWS, [0, 1, 2], pad_id=0)
    with torch.no_grad():
        logps, counts, _, _ = sequence_logps(model, batch, chunk_size)
        expected = naive(model)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)
    assert counts.tolist() == [4, 6, 2, 2, 3, 7]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_gives_the_padded_logps(model, layout):
    batch = collate_pairs(ROWS, [0, 1, 2], pad_id=0, **LAYOUTS[layout])
    with torch.no_grad():
        logps, counts, _, _ = sequence_logps(model, batch, chunk_size=5)
        expected = naive(model)
    torch.testing.assert_close(logps, expected, atol=1e-4, rtol=0)
    assert counts.tolist() == [4, 6, 2, 2, 3, 7]


def test_packing_and_prefix_sharing_compute_fewer_tokens():
    padded = collate_pairs(ROWS, [0, 1, 2], pad_id=0)
    packed = collate_pairs(ROWS, [0, 1, 2], pad_id=0, packing=True, pack_length=24)
    shared = collate_pairs(ROWS, [0, 1, 2], pad_id=0, packing=True, prefix_sharing=True)
    prompts = sum(len(r["prompt_ids"]) for r in ROWS)
    assert packed.num_tokens == padded.num_tokens  # the same tokens, less padding
    assert packed.input_ids.shape[0] == 3 and packed.input_ids.shape[1] <= 24 and padded.input_ids.shape == (6, 12)
    assert (
        packed.token_mask.sum() == packed.num_tokens and (packed.token_mask[:, :-1] >= packed.token_mask[:, 1:]).all()
    )  # no gap inside rows
    assert shared.num_tokens == padded.num_tokens - prompts  # each prompt computed once


def test_prefix_shared_mask_hides_chosen_from_rejected():
    batch = collate_pairs(ROWS[:1], [0], pad_id=0, prefix_sharing=True)
    p, c = 6, 4
    assert batch.segments == (Segment(row=0, start=0, shared=p, branches=(c, 2)),)
    mask = dense_mask(batch)[0, 0]  # [L, L], what the segments mean
    first_rejected = p + c
    assert mask[first_rejected, :p].all()  # sees the whole prompt
    assert not mask[first_rejected, p:first_rejected].any()  # sees no chosen token
    assert mask[first_rejected, first_rejected]
    assert batch.position_ids[0].tolist() == list(range(p + c)) + [p, p + 1]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_gradients_equal_full_logits(tiny_model_dir, layout):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = collate_pairs(ROWS, [0, 1, 2], pad_id=0, **LAYOUTS[layout])
    out = concatenated_forward(model, batch, chunk_size=3)
    (out.chosen_logps - 0.5 * out.rejected_logps).sum().backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = naive(model)
    (full[:3] - 0.5 * full[3:]).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(chunked[name], param.grad, atol=1e-5, rtol=1e-3, msg=name)


def test_logps_do_not_depend_on_batch_composition(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        joint = concatenated_forward(model, pad_pairs(ROWS, [0, 1, 2], pad_id=0))
        alone = [concatenated_forward(model, pad_pairs([row], [i], pad_id=0)) for i, row in enumerate(ROWS)]
    torch.testing.assert_close(joint.chosen_logps, torch.cat([a.chosen_logps for a in alone]), atol=1e-5, rtol=0)
    torch.testing.assert_close(joint.rejected_logps, torch.cat([a.rejected_logps for a in alone]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_activation_checkpointing_changes_no_gradient(tiny_model_dir, method):
    from dpokit.config import LoraConfig, ModelConfig
    from dpokit.model import load_policy

    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation both times
        policy = load_policy(
            ModelConfig(path=str(tiny_model_dir), method=method, activation_checkpointing=checkpointing),
            LoraConfig(),
            torch.device("cpu"),
        )
        policy.train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in policy.modules()) == checkpointing
        out = concatenated_forward(policy, collate_pairs(ROWS, [0, 1, 2], pad_id=0, packing=True, prefix_sharing=True))
        (out.chosen_logps - 0.5 * out.rejected_logps).sum().backward()
        gradients.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys() and any(g.abs().sum() > 0 for g in gradients[0].values())
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_per_token_logps_and_token_stats_equal_the_models_own_in_every_layout(model, layout):
    token_logps, log_sq_norm, entropy = naive_token_values(model, ROWS)
    batch = collate_pairs(ROWS, [0, 1, 2], pad_id=0, **LAYOUTS[layout])
    with torch.no_grad():
        out = concatenated_forward(model, batch, chunk_size=5, token_stats=("log_sq_norm", "entropy"))
    b = len(ROWS)
    for side, offset in (("chosen", 0), ("rejected", b)):
        mask = getattr(out, f"{side}_token_mask")
        for i in range(b):
            expected = {
                "logps": token_logps[offset + i],
                "log_sq_norm": log_sq_norm[offset + i],
                "entropy": entropy[offset + i],
            }
            got = {
                "logps": getattr(out, f"{side}_token_logps")[i][mask[i]],
                "log_sq_norm": out.token_stats["log_sq_norm"][0 if side == "chosen" else 1][i][mask[i]],
                "entropy": out.token_stats["entropy"][0 if side == "chosen" else 1][i][mask[i]],
            }
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=0, msg=f"{side} {i} {name}")
    torch.testing.assert_close(
        (out.chosen_token_logps * out.chosen_token_mask).sum(-1), out.chosen_logps, atol=1e-5, rtol=0
    )


def test_the_common_path_computes_no_token_stats(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = concatenated_forward(model, collate_pairs(ROWS, [0, 1, 2], pad_id=0))
    assert out.token_stats == {} and out.has_token_logps


@pytest.mark.parametrize("keep_softmax", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_the_fused_chunk_gradient_equals_checkpointing_the_plain_computation(bias, keep_softmax):
    from torch.utils.checkpoint import checkpoint

    from dpokit.logps import FusedChunkLogps, _chunk_token_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(7, 16, requires_grad=True)
    targets = torch.randint(0, 50, (7,))
    weights = torch.randn(7)  # an arbitrary upstream gradient
    results = []
    for fused in (True, False):
        head.zero_grad()
        hidden.grad = None
        if fused:
            logps, _ = FusedChunkLogps.apply(hidden, head.weight, head.bias, targets, keep_softmax)
        else:
            logps, _, _ = checkpoint(_chunk_token_logps, head, None, hidden, targets, (), use_reentrant=False)
        (logps * weights).sum().backward()
        results.append(
            [logps.detach(), hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
        )
    for fused_value, plain_value in zip(*results):
        torch.testing.assert_close(fused_value, plain_value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [4, 1024])  # several chunks (logits recomputed) or one (its softmax kept)
def test_training_gradients_are_the_same_through_the_fused_head(tiny_model_dir, monkeypatch, chunk_size):
    import dpokit.logps as logps_module

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert logps_module.fused_head(model.get_output_embeddings(), None, (), torch.zeros(1, 1))  # the plain head fuses
    batch = collate_pairs(ROWS, [0, 1, 2], pad_id=0, packing=True, prefix_sharing=True)
    gradients = []
    for fused in (True, False):
        monkeypatch.setattr(logps_module, "fused_head", lambda *args, on=fused: on)
        model.zero_grad()
        out = concatenated_forward(model, batch, chunk_size=chunk_size)
        (out.chosen_logps - 0.5 * out.rejected_logps).sum().backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradient, gradients[1][name], atol=1e-6, rtol=0, msg=name)


def test_chunks_hold_as_many_positions_as_the_byte_budget_allows():
    from dpokit.logps import CHUNK_BYTES, chunk_positions

    assert chunk_positions(32000, torch.device("cpu")) == CHUNK_BYTES["cpu"] // (4 * 32000) == 262
    assert chunk_positions(32000, torch.device("cpu"), chunk_size=1024) == 1024
    assert chunk_positions(10**9, torch.device("cpu")) == 1
