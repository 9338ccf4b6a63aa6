"""`dpokit plan`: per-device memory from a config and a model's config.json, on the meta device.

The 8B numbers are checked against a hand calculation from Llama 3.1 8B's published shapes; the tiny
model's against the real tensors of a loaded policy after an optimizer step, and the activation formula
against the tensors autograd really saves.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from dpokit.cli import main
from dpokit.config import load_config
from dpokit.errors import DpokitError
from dpokit.plan import (
    _census,
    estimate,
    model_census,
    model_config_file,
    parse_memory_size,
    plan_memory,
    workload,
)

# Llama 3.1 8B: hidden 4096, intermediate 14336, 32 layers, 32 heads of 128, 8 KV heads, vocab 128256, untied.
PARAMS_8B = 8_030_261_248
LINEAR_8B = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)  # q, o; k, v; gate, up, down
LORA_8B = 32 * 8 * ((4096 + 4096) * 2 + (4096 + 1024) + 3 * (4096 + 14336))  # rank 8 on q, o; v; gate, up, down
TENSORS_8B = 32 * 9 + 3  # 7 projections + 2 norms per layer; embeddings, final norm, head
LORA_TENSORS_8B = 32 * 6 * 2  # A and B per adapted projection


def hand_8b(config: str) -> dict[str, int]:
    """Weights, gradients and optimizer state per GPU of a shipped 8B config, from the parameter count."""
    if config == "llama3_1_8b_full_4gpu":  # pure bf16 as torchtune: weights, AdamW in bf16, all sharded 4 ways
        return {
            "weights (stored)": PARAMS_8B * 2 // 4,
            "gradients": PARAMS_8B * 2 // 4,
            "optimizer state": 2 * 2 * PARAMS_8B // 4 + 4 * TENSORS_8B,
            "gradients between micro-steps (FSDP)": PARAMS_8B * 4,
        }  # accumulation 8: every gradient unsharded in fp32 (the reduce dtype) until the last micro-step
    if config == "llama3_1_8b_lora_2gpu":  # bf16 base, fp32 adapters, sharded 2 ways
        return {
            "weights (stored)": (PARAMS_8B * 2 + LORA_8B * 4) // 2,
            "gradients": LORA_8B * 4 // 2,
            "optimizer state": 2 * 4 * LORA_8B // 2 + 4 * LORA_TENSORS_8B,
        }
    if config == "llama3_1_8b_lora_single_device":
        return {
            "weights (stored)": PARAMS_8B * 2 + LORA_8B * 4,
            "gradients": LORA_8B * 4,
            "optimizer state": 2 * 4 * LORA_8B + 4 * LORA_TENSORS_8B,
        }
    # QLoRA: NF4 projections (0.5 B + an 8-bit absmax per 64 + an fp32 per 64 x 256 + a 1 KiB code per tensor),
    # the rest fp32 (peft's k-bit preparation), fp32 adapters; AdamW (torchtune's) in fp32.
    nf4 = LINEAR_8B // 2 + LINEAR_8B // 64 + 4 * LINEAR_8B // (64 * 256) + 1024 * 32 * 7
    return {
        "weights (stored)": nf4 + (PARAMS_8B - LINEAR_8B) * 4 + LORA_8B * 4,
        "gradients": LORA_8B * 4,
        "optimizer state": 2 * 4 * LORA_8B + 4 * LORA_TENSORS_8B,
    }


@pytest.mark.parametrize(
    "config,gpus",
    [
        ("llama3_1_8b_full_4gpu", 4),
        ("llama3_1_8b_lora_2gpu", 2),
        ("llama3_1_8b_lora_single_device", 1),
        ("llama3_1_8b_qlora_single_device", 1),
    ],
)
def test_shipped_8b_configs_give_the_hand_calculated_bytes_per_gpu(config, gpus):
    plan = plan_memory(config, [], gpus=gpus)
    assert plan.params == PARAMS_8B
    assert plan.trainable == (PARAMS_8B if "full" in config else LORA_8B)
    for label, expected in hand_8b(config).items():
        assert plan.bytes(label) == expected, label


def test_accumulating_under_fsdp_holds_every_gradient_unsharded_in_fp32():
    plan = plan_memory(
        "llama3_1_8b_full_4gpu", ["model.precision=mixed", "training.gradient_accumulation_steps=2"], gpus=4
    )
    assert plan.bytes("gradients between micro-steps (FSDP)") == PARAMS_8B * 4  # not divided by the 4 GPUs


def test_the_8b_plan_takes_seconds_and_allocates_no_parameter_memory(monkeypatch):
    from transformers import AutoModelForCausalLM

    built = []
    original = AutoModelForCausalLM.from_config
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_config", lambda *a, **k: built.append(original(*a, **k)) or built[-1]
    )
    _census.cache_clear()
    started = time.perf_counter()
    plan = plan_memory("llama3_1_8b_full_4gpu", [], gpus=4)
    assert time.perf_counter() - started < 10
    assert plan.params == PARAMS_8B and len(built) == 1
    assert all(p.device.type == "meta" for p in built[0].parameters())


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.method=full"],
        ["model.method=full", "model.dtype=bfloat16", "model.precision=pure"],
        ["model.method=lora", "model.dtype=bfloat16"],  # bf16 base, fp32 adapters
        ["model.method=dora"],
    ],
)
def test_weights_gradients_and_adamw_state_equal_the_real_tensors_after_a_step(overrides, tiny_model_dir, prepared_dir):
    from dpokit.data.collate import collate_pairs
    from dpokit.data.prepared import load_prepared
    from dpokit.logps import concatenated_forward
    from dpokit.model import load_policy
    from dpokit.optim import build_optimizer

    cfg = load_config("tiny_lora", [f"model.path={tiny_model_dir}", *overrides], world_size=1)
    census = model_census(tiny_model_dir / "config.json", cfg.model.method, cfg.lora)
    plan = estimate(census, cfg, workload(cfg, str(prepared_dir)), 1, "cpu")

    policy = load_policy(cfg.model, cfg.lora, torch.device("cpu"))
    optimizer = build_optimizer(policy, cfg.optimizer)
    rows = [load_prepared(prepared_dir).split("train")[i] for i in range(2)]
    out = concatenated_forward(policy, collate_pairs(rows, [0, 1], 0, packing=True, prefix_sharing=True))
    (out.chosen_logps - out.rejected_logps).sum().backward()
    optimizer.step()

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    assert plan.bytes("weights (stored)") == nbytes(policy.parameters())
    assert plan.bytes("gradients") == nbytes(p.grad for p in policy.parameters() if p.grad is not None)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    assert plan.bytes("optimizer state") == nbytes(state)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.method=full"],
        ["model.method=lora", "model.dtype=bfloat16"],
        ["model.method=full", "model.dtype=bfloat16", "model.precision=mixed"],  # autocast: fp32 residual, cast copies
        ["model.method=dora"],
    ],
)
def test_saved_activations_match_what_autograd_keeps(overrides, tiny_model_dir, prepared_dir):
    """The tensors the forward leaves saved for backward (each storage once; parameters, autocast's weight copies
    and graphs already freed left out), with every pair as long as the longest, equal the plan's saved
    activations within 2%."""
    import contextlib
    import weakref

    from dpokit.data.collate import collate_pairs
    from dpokit.data.prepared import load_prepared, pair_token_counts
    from dpokit.logps import concatenated_forward
    from dpokit.model import load_policy, training_dtypes

    cfg = load_config("tiny_lora", [f"model.path={tiny_model_dir}", "data.batch_size=3", *overrides], world_size=1)
    census = model_census(tiny_model_dir / "config.json", cfg.model.method, cfg.lora)
    plan = estimate(census, cfg, workload(cfg, str(prepared_dir)), 1, "cpu")

    split = load_prepared(prepared_dir).split("train")
    prompt, chosen, rejected = pair_token_counts(split)
    longest = split[int((prompt + chosen + rejected).argmax())]
    batch = collate_pairs([longest] * 3, [0, 1, 2], 0, packing=True, prefix_sharing=True)
    policy = load_policy(cfg.model, cfg.lora, torch.device("cpu"))
    weights = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    weight_shapes = {tuple(p.shape) for p in policy.parameters()}
    saved: dict[int, tuple[int, weakref.ref]] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and not (tensor.dim() == 2 and tuple(tensor.shape) in weight_shapes):
            saved[storage.data_ptr()] = (storage.nbytes(), weakref.ref(tensor))
        return tensor

    params_dtype, compute_dtype = training_dtypes(cfg.model, torch.device("cpu"))
    autocast = torch.autocast("cpu", dtype=compute_dtype) if params_dtype != compute_dtype else contextlib.nullcontext()
    with autocast, torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = concatenated_forward(policy, batch)
    alive = sum(nbytes for nbytes, tensor in saved.values() if tensor() is not None)
    assert out.chosen_logps.requires_grad
    kept = plan.bytes("softmax kept for backward")  # one chunk holds every completion token (not under autocast)
    assert (kept > 0) == (overrides != ["model.method=full", "model.dtype=bfloat16", "model.precision=mixed"])
    assert alive == pytest.approx(plan.bytes("activations (saved)") + kept, rel=0.02)


def test_the_cli_prints_the_verdict_and_what_would_make_it_fit(capsys):
    assert main(["plan", "--config", "llama3_1_8b_lora_single_device", "--gpu-memory", "40GB"]) == 0
    out = capsys.readouterr().out
    assert "fits:" in out and "of 40.00 GB per GPU" in out
    assert main(["plan", "--config", "llama3_1_8b_lora_single_device", "--gpu-memory", "16GB"]) == 1
    out = capsys.readouterr().out
    assert "does not fit:" in out and "model.method=qlora" in out


def test_a_bad_gpu_memory_is_one_clear_error(capsys):
    assert main(["plan", "--config", "llama3_1_8b_lora_single_device", "--gpu-memory", "lots"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --gpu-memory 'lots' is not a memory size") and "80GB" in err and "\n" not in err


def test_memory_sizes_read_decimal_and_binary_units():
    assert parse_memory_size("80GB") == parse_memory_size("80") == 80 * 10**9
    assert parse_memory_size("24GiB") == 24 * 2**30 and parse_memory_size("40960 MiB") == 40 * 2**30
    assert parse_memory_size("1.5tb") == 1.5e12
    for bad in ("0GB", "-1GB", "80 GBs", ""):
        with pytest.raises(DpokitError, match="not a memory size"):
            parse_memory_size(bad)


def test_a_hub_name_needs_a_shipped_or_local_config(tmp_path):
    assert model_config_file("meta-llama/Llama-3.1-8B-Instruct").name == "llama3_1_8b.json"
    assert model_config_file("Qwen/Qwen2.5-0.5B-Instruct").name == "qwen2_5_0_5b.json"
    with pytest.raises(DpokitError, match="downloads nothing: pass --model"):
        model_config_file("someone/unknown-model")
    with pytest.raises(DpokitError, match="no model to plan for"):
        model_config_file("")
    with pytest.raises(DpokitError, match="has no config.json"):
        model_config_file(str(tmp_path))


def test_the_shipped_qwen_config_has_its_published_size():
    cfg = load_config("qwen2_5_0_5b_full")
    census = model_census(model_config_file(cfg.model.path), "full", cfg.lora)
    assert census.params == 494_032_768 and census.tied  # Qwen2.5-0.5B: tied embeddings
    assert math.isclose(census.params * 16 / 1e9, 7.9, abs_tol=0.05)  # 16 B/param with fp32 AdamW


@pytest.mark.parametrize("overrides", [["model.method=full"], ["model.method=lora", "model.dtype=bfloat16"]])
def test_saved_activations_of_the_layout_attention_match_what_autograd_keeps(
    overrides, tiny_model_dir, prepared_dir, monkeypatch
):
    """The same check when the rows take `dpokit.attention`'s kernels (no mask, grouped k/v) instead of a mask."""
    from dpokit import attention

    monkeypatch.setattr(attention, "DENSE_MAX_WIDTH", 0)
    cfg = load_config("tiny_lora", [f"model.path={tiny_model_dir}", *overrides], world_size=1)
    assert workload(cfg, str(prepared_dir)).layout_attention
    test_saved_activations_match_what_autograd_keeps(overrides, tiny_model_dir, prepared_dir)
