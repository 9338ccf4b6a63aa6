"""A run starts where it should: DPO after SFT starts at the SFT model, the step-0 check stops a run
whose reference is another model, precision that trains, and the cache records how it was computed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from dpokit.cli import main
from dpokit.config import load_config
from dpokit.data.collate import pad_pairs
from dpokit.data.prepared import load_prepared
from dpokit.errors import DpokitError
from dpokit.fidelity import check_step_zero, tolerance
from dpokit.launch import builtin_recipe_path, load_recipe_module
from dpokit.logps import naive_sequence_logps
from dpokit.metrics import read_metrics
from dpokit.reference.cache import open_cache
from dpokit.types import ChosenRejectedOutputs

RECIPE = load_recipe_module(builtin_recipe_path())


def ref_logps(prepared, model, out, *extra) -> None:
    assert (
        main(["ref-logps", str(prepared), "--model", str(model), "--out", str(out), "--batch-size", "8", *extra]) == 0
    )


def train(model, prepared, run, cache, *extra) -> int:
    return main(
        [
            "train",
            "--config",
            "tiny_lora",
            "--data",
            str(prepared),
            "--model",
            str(model),
            "--out",
            str(run),
            "--ref-cache",
            str(cache),
            "--max-steps",
            "1",
            "training.eval_every=0",
            *extra,
        ]
    )


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_on_an_adapter_dir_starts_at_zero_rewards(method, tiny_model_dir, prepared_dir, adapter_dir, tmp_path):
    cache = tmp_path / "ref.h5"
    ref_logps(prepared_dir, tiny_model_dir, cache, "--adapter", str(adapter_dir))
    assert (
        train(
            tiny_model_dir,
            prepared_dir,
            tmp_path / "run",
            cache,
            "--method",
            method,
            f"reference.adapter={adapter_dir}",
        )
        == 0
    )
    first = read_metrics(tmp_path / "run", "train")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)


def test_lora_continues_the_adapter_dir(tiny_model_dir, prepared_dir, adapter_dir, tmp_path):
    import json

    cache = tmp_path / "ref.h5"
    ref_logps(prepared_dir, tiny_model_dir, cache, "--adapter", str(adapter_dir))
    assert (
        train(tiny_model_dir, prepared_dir, tmp_path / "run", cache, f"reference.adapter={adapter_dir}", "lora.rank=16")
        == 0
    )
    saved = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*/adapter_config.json")).read_text())
    assert saved["r"] == 4  # the SFT adapter's own rank, not lora.rank
    assert sorted(saved["target_modules"]) == ["down_proj", "q_proj", "v_proj"]


def test_a_lora_adapter_is_not_continued_as_dora(tiny_model_dir, prepared_dir, adapter_dir, tmp_path, capsys):
    cache = tmp_path / "ref.h5"
    ref_logps(prepared_dir, tiny_model_dir, cache, "--adapter", str(adapter_dir))
    assert (
        train(
            tiny_model_dir,
            prepared_dir,
            tmp_path / "run",
            cache,
            "--method",
            "dora",
            f"reference.adapter={adapter_dir}",
        )
        == 1
    )
    assert "use model.method=lora" in capsys.readouterr().err


def test_step_zero_check_stops_a_run_whose_cache_was_computed_in_another_dtype(
    tiny_model_dir, prepared_dir, tmp_path, capsys
):
    cache = tmp_path / "ref.h5"
    ref_logps(prepared_dir, tiny_model_dir, cache, "--dtype", "bfloat16")
    assert train(tiny_model_dir, prepared_dir, tmp_path / "run", cache) == 1
    err = capsys.readouterr().err
    assert "computed with compute dtype bfloat16, this run uses float32" in err  # said before the check
    assert "step-0 check: the policy does not start as the reference" in err
    assert "another compute dtype or attention implementation than the cache's (the cache's: bfloat16" in err
    assert "another adapter" in err and "chat template" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before the first update


def outputs(logps: list[float], tokens: list[int]) -> ChosenRejectedOutputs:
    half = len(logps) // 2
    values, counts = torch.tensor(logps), torch.tensor(tokens)
    return ChosenRejectedOutputs(
        chosen_logps=values[:half],
        rejected_logps=values[half:],
        chosen_tokens=counts[:half],
        rejected_tokens=counts[half:],
    )


def test_step_zero_tolerance_fits_the_dtype():
    reference = outputs([-10.0, -20.0], [10, 100])
    check_step_zero(outputs([-10.0 + 5e-4, -20.0 - 5e-3], [10, 100]), reference, torch.float32, "cache")
    with pytest.raises(DpokitError, match="step-0 check"):
        check_step_zero(outputs([-10.0 + 5e-3, -20.0], [10, 100]), reference, torch.float32, "cache")
    check_step_zero(outputs([-10.0 + 0.9, -20.0 - 4.0], [10, 100]), reference, torch.bfloat16, "cache")
    with pytest.raises(DpokitError, match="step-0 check"):
        check_step_zero(outputs([-10.0 + 2.0, -20.0], [10, 100]), reference, torch.bfloat16, "cache")
    assert tolerance(torch.float32, torch.tensor([0])).item() == pytest.approx(1e-3)


def full_bf16_step(model_dir, data_dir, run_dir, precision: str):
    args = [
        f"model.path={model_dir}",
        f"data.path={data_dir}",
        f"output.dir={run_dir}",
        "model.method=full",
        "model.dtype=bfloat16",
        f"model.precision={precision}",
        "loss.name=simpo",
        "optimizer.lr=1e-6",
        "scheduler.name=constant",
        "training.max_steps=1",
        "training.eval_every=0",
    ]
    recipe = RECIPE.DPORecipe(load_config("tiny_lora", args))
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return recipe.policy


def changed_fraction(policy, model_dir) -> float:
    """Fraction of decoder-layer weights that differ from the start (every one of them gets a gradient)."""
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    changed = total = 0
    for name, param in policy.state_dict().items():
        if name in initial and ".layers." in name:
            changed += int((param.float() != initial[name].to(param.dtype).float()).sum())
            total += param.numel()
    return changed / total


def test_full_fine_tuning_in_bf16_keeps_fp32_master_weights(tiny_model_dir, prepared_dir, tmp_path):
    mixed = full_bf16_step(tiny_model_dir, prepared_dir, tmp_path / "mixed", "mixed")
    assert next(mixed.parameters()).dtype == torch.float32
    pure = full_bf16_step(tiny_model_dir, prepared_dir, tmp_path / "pure", "pure")
    assert next(pure.parameters()).dtype == torch.bfloat16
    mixed_changed, pure_changed = changed_fraction(mixed, tiny_model_dir), changed_fraction(pure, tiny_model_dir)
    assert mixed_changed > 0.95, mixed_changed  # lr 1e-6 moves fp32 master weights
    assert pure_changed < 0.05, pure_changed  # in bf16 nearly every update rounds away


def test_float16_training_is_refused(tiny_model_dir, prepared_dir, tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--config",
                "tiny_lora",
                "--data",
                str(prepared_dir),
                "--model",
                str(tiny_model_dir),
                "--out",
                str(tmp_path / "run"),
                "--ref",
                "live",
                "model.dtype=float16",
            ]
        )
        == 1
    )
    assert "model.dtype=float16 is not supported for training" in capsys.readouterr().err


@pytest.mark.parametrize(("family", "attention"), [("gemma2", "eager"), ("mistral", "sdpa"), ("granite", "sdpa")])
def test_ref_logps_caches_the_models_own_logps_and_records_its_attention(
    family, attention, family_dirs, prepared_dir, tmp_path
):
    cache_path = tmp_path / "ref.h5"
    ref_logps(prepared_dir, family_dirs[family], cache_path, "--splits", "train")
    cache = open_cache(cache_path)
    assert cache.attrs["attn_implementation"] == attention
    rows = list(load_prepared(prepared_dir).split("train"))[:8]
    batch = pad_pairs(rows, list(range(8)), pad_id=0)
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = naive_sequence_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask).numpy()
    cached = cache.logps("train")
    got = np.concatenate([cached.chosen_logps[:8].numpy(), cached.rejected_logps[:8].numpy()])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_train_says_when_the_cache_used_another_attention_implementation(
    tiny_model_dir, prepared_dir, tmp_path, capsys
):
    cache = tmp_path / "ref.h5"
    ref_logps(prepared_dir, tiny_model_dir, cache, "--attn-implementation", "eager")
    assert train(tiny_model_dir, prepared_dir, tmp_path / "run", cache) == 0  # fp32: eager and SDPA agree to 1e-6
    assert "attention implementation eager, this run uses sdpa" in capsys.readouterr().err
