"""Losses in real training runs: every objective from the CLI on the demo at step 1, token-level losses from
the cache and live, and the checks on what a loss returns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import naive_token_values, train_cli_args
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.losses import LOSSES
from dpokit.metrics import read_metrics
from dpokit.quickstart import demo_files

REPO = Path(__file__).resolve().parents[1]
DEMO_PAIRS = 32
LN2 = math.log(2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """The first pairs of the bundled demo, prepared with the demo model's template, and a per-token cache."""
    files = demo_files()
    root = tmp_path_factory.mktemp("demo")
    (root / "pairs.jsonl").write_text("".join(files.train.read_text().splitlines(keepends=True)[:DEMO_PAIRS]))
    assert (
        main(["prepare", str(root / "pairs.jsonl"), "--model", str(files.model), "--out", str(root / "prepared")]) == 0
    )
    assert (
        main(
            [
                "ref-logps",
                str(root / "prepared"),
                "--model",
                str(files.model),
                "--out",
                str(root / "ref.h5"),
                "--per-token",
            ]
        )
        == 0
    )
    return {"model": files.model, "prepared": root / "prepared", "cache": root / "ref.h5"}


def model_values(demo) -> dict[str, torch.Tensor]:
    """Per pair, from the demo model's own logits: sums and counts of chosen/rejected token log-probs, and WPO's
    per-sequence weights (token mean of log p - log sum_v p^2)."""
    from transformers import AutoModelForCausalLM

    from dpokit.data.prepared import load_prepared

    rows = list(load_prepared(demo["prepared"]).split("train"))
    token_logps, log_sq_norm, _ = naive_token_values(AutoModelForCausalLM.from_pretrained(demo["model"]), rows)
    n = len(rows)
    logps = torch.stack([t.sum() for t in token_logps])
    counts = torch.tensor([float(t.numel()) for t in token_logps])
    weights = torch.stack([(t - q).mean() for t, q in zip(token_logps, log_sq_norm)])
    return {
        "chosen": logps[:n],
        "rejected": logps[n:],
        "chosen_tokens": counts[:n],
        "rejected_tokens": counts[n:],
        "wpo": torch.clamp(torch.exp(weights[:n] + weights[n:]), max=1),
    }


def reference_free_step_one(name: str, v: dict[str, torch.Tensor]) -> float:
    avg_w, avg_l = v["chosen"] / v["chosen_tokens"], v["rejected"] / v["rejected_tokens"]
    if name == "simpo":  # beta 2, gamma 0.5
        return float(-torch.nn.functional.logsigmoid(2.0 * (avg_w - avg_l) - 0.5).mean())
    if name == "orpo":  # beta 0.1
        log_odds = (avg_w - avg_l) - (torch.log1p(-torch.exp(avg_w)) - torch.log1p(-torch.exp(avg_l)))
        return float((-avg_w - 0.1 * torch.nn.functional.logsigmoid(log_odds)).mean())
    if name == "sft":  # token mean over the batch
        return float(-v["chosen"].sum() / v["chosen_tokens"].sum())
    if name == "wpo":  # DPO's ln 2, weighted
        return float(LN2 * v["wpo"].mean())
    raise KeyError(name)


# Each objective's loss at step 1, where the policy is the reference (h = r_w = r_l = 0), with its defaults.
AT_ZERO_REWARD = {
    "dpo": LN2,
    "robust": LN2,
    "dpo_norm": LN2,
    "ld_dpo": LN2,
    "dpop": LN2,
    "aot_pair": LN2,
    "aot": LN2,
    "rso": 1.0,
    "hinge": 1.0,
    "ipo": 1 / (2 * 0.1) ** 2,
    "exo": -LN2 - 0.5 * math.log(1e-3 * (1 - 1e-3)),
    "nca": 2 * LN2,
    "bco": 2 * LN2,
    "sppo_hard": 0.5 / 0.1**2,
    "apo_zero": 1.0,
    "apo_down": 1.0,
    "discopop": (LN2 + 1) / 2,
}


PAIRWISE = sorted(  # the demo is pairs
    name
    for name, cls in LOSSES.items()
    if not (getattr(cls, "is_listwise", False) or getattr(cls, "is_unpaired", False))
)


def test_every_registered_objective_is_checked_below():
    assert set(PAIRWISE) == set(AT_ZERO_REWARD) | {"simpo", "orpo", "sft", "wpo"}


@pytest.mark.slow
def test_every_objective_trains_from_the_cli_on_the_demo_and_starts_at_its_closed_form(demo, tmp_path):
    values = model_values(demo)
    for name in PAIRWISE:
        run = tmp_path / name
        args = [
            "train",
            "--config",
            "demo_lora",
            "--data",
            str(demo["prepared"]),
            "--model",
            str(demo["model"]),
            "--ref-cache",
            str(demo["cache"]),
            "--out",
            str(run),
            "--loss",
            name,
            "--max-steps",
            "1",
            "--batch-size",
            str(DEMO_PAIRS),
            "data.shuffle=false",
            "training.eval_every=0",
        ]
        assert main(args) == 0, name
        (first,) = read_metrics(run, "train")
        expected = AT_ZERO_REWARD[name] if name in AT_ZERO_REWARD else reference_free_step_one(name, values)
        assert first["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-5), name


# ----------------------------------------------------------------------------------------------
# token-level losses written against the documented interface (examples/custom_losses.py)


@pytest.mark.parametrize("loss", ["custom_losses:LengthDesensitizedDPO", "custom_losses:WeightedDPO", "ld_dpo", "wpo"])
def test_a_token_level_loss_trains_the_same_from_the_per_token_cache_and_live(loss, demo, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    common = ["--loss", loss, "--max-steps", "3", "--lr", "1e-2", "data.batch_size=8", "data.shuffle=false"]
    live, cached = tmp_path / "live", tmp_path / "cached"
    assert main(train_cli_args(demo["model"], demo["prepared"], live, *common)) == 0
    assert (
        main(
            train_cli_args(
                demo["model"],
                demo["prepared"],
                cached,
                *common,
                "reference.source=cache",
                f"reference.cache={demo['cache']}",
            )
        )
        == 0
    )
    live_losses = [r["loss"] for r in read_metrics(live, "train")]
    assert [r["loss"] for r in read_metrics(cached, "train")] == pytest.approx(live_losses, abs=1e-5)
    assert live_losses[-1] != pytest.approx(live_losses[0], abs=1e-4)  # it trained


def test_a_token_level_loss_refuses_a_cache_without_per_token_values(
    tiny_model_dir, prepared_dir, ref_cache, tmp_path, capsys
):
    args = train_cli_args(
        tiny_model_dir,
        prepared_dir,
        tmp_path / "run",
        "--loss",
        "ld_dpo",
        "--max-steps",
        "1",
        "reference.source=cache",
        f"reference.cache={ref_cache}",
    )
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "loss ld_dpo needs per-token reference log-probs" in err and "--per-token" in err and "--ref live" in err


# ----------------------------------------------------------------------------------------------
# what a loss returns


def test_a_loss_returning_a_scalar_stops_with_one_line_and_the_last_checkpoint_stays_loadable(
    train_cli, tmp_path, misbehaving_losses, capsys
):
    run = tmp_path / "run"
    args = train_cli(
        run,
        "--max-steps",
        "4",
        "--loss",
        f"{misbehaving_losses}:ScalarAfter",
        "loss.after=3",
        "data.batch_size=2",
        "training.save_every=1",
    )
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: loss ScalarAfter returned shapes (), (2,), (2,)") and "each must be [2]" in err
    weights = load_file(str(run / "checkpoints" / "step_0000002" / "adapter_model.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def test_a_weighted_combination_logs_each_term_and_plots_them(train_cli, tmp_path):
    run = tmp_path / "run"
    assert (
        main(train_cli(run, "--loss", "dpo,sft", "loss.weights=1.0,0.5", "--max-steps", "2", "training.eval_every=2"))
        == 0
    )
    for record in read_metrics(run):
        assert record["loss"] == pytest.approx(record["loss/dpo"] + 0.5 * record["loss/sft"], abs=1e-5)
    assert read_metrics(run, "train")[0]["loss/dpo"] == pytest.approx(LN2, abs=1e-5)
    from dpokit.metrics import plot_run

    assert (run / "plots" / "loss_terms.png") in plot_run(run)
