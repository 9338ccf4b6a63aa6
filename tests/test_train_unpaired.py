"""Unpaired (KTO) data end to end: `prepare` -> `ref-logps` -> `train` on prompt, completion, label rows.

The cache holds each example's completion and its mismatched (KL) completion, each equal to the model's own
forward; KTO starts at half each example's weight with a KL estimate of 0, equals a live reference step by step,
and two processes equal one (the KL estimate is reduced over both); a kill -9 resumes exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import ONE_PROCESS_RUN, TWO_PROCESS_RUN, run_dpokit_elsewhere, train_cli_args
from test_faults import kill_launcher_and_workers, start_train, wait_for_steps
from test_train_ranked import own_logps

from dpokit.cli import main
from dpokit.data.loader import example_rows
from dpokit.data.prepared import load_prepared
from dpokit.metrics import read_metrics
from dpokit.reference.cache import open_cache

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo" / "data" / "unpaired.jsonl"


@pytest.fixture(scope="session")
def unpaired_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The bundled unpaired demo prepared with the tiny model's template, with an eval split."""
    out = tmp_path_factory.mktemp("unpaired") / "prepared"
    args = ["prepare", str(DEMO), "--model", str(tiny_model_dir), "--out", str(out), "--eval-fraction", "0.2"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def unpaired_cache(tiny_model_dir, unpaired_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unpaired_cache") / "ref.h5"
    args = ["ref-logps", str(unpaired_dir), "--model", str(tiny_model_dir), "--out", str(path), "--batch-size", "4"]
    assert main(args) == 0
    return path


def test_the_cache_holds_each_completion_and_its_kl_completion_as_the_model_computes_them(
    tiny_model_dir, unpaired_dir, unpaired_cache
):
    cache, prepared = open_cache(unpaired_cache), load_prepared(unpaired_dir)
    assert prepared.is_unpaired and prepared.is_grouped and cache.splits == ["train", "eval"]
    for split in cache.splits:
        data = prepared.split(split)
        rows = example_rows(data, list(range(len(data))))
        table = cache.logps(split)
        assert np.diff(table.group_offsets.numpy()).tolist() == [2] * len(rows)
        expected, counts = own_logps(tiny_model_dir, data)
        np.testing.assert_allclose(table.logps.numpy(), expected, atol=1e-4, rtol=0)
        assert table.tokens.numpy().tolist() == counts.tolist()
        # the KL completion of row i is row i+1's completion (the last row's: the first row's)
        for i, row in enumerate(rows):
            assert row["completion_ids"][1] == rows[(i + 1) % len(rows)]["completion_ids"][0]


def unpaired_train(tiny_model_dir, unpaired_dir, run_dir, *extra) -> list[str]:
    return train_cli_args(tiny_model_dir, unpaired_dir, run_dir, "data.batch_size=4", "data.shuffle=false", *extra)


def test_kto_starts_at_half_each_weight_with_kl_0_and_equals_a_live_reference(
    tiny_model_dir, unpaired_dir, unpaired_cache, tmp_path
):
    cached, live = tmp_path / "cached", tmp_path / "live"
    steps = ["--max-steps", "3", "--lr", "1e-3", "loss.name=kto", "loss.undesirable_weight=1.5", "eval.samples=0"]
    assert main(unpaired_train(tiny_model_dir, unpaired_dir, cached, *steps, f"reference.cache={unpaired_cache}",
                               "reference.source=cache")) == 0  # fmt: skip
    assert main(unpaired_train(tiny_model_dir, unpaired_dir, live, *steps)) == 0
    rows = example_rows(load_prepared(unpaired_dir).split("train"), [0, 1, 2, 3])
    labels = [row["scores"][0] == 1.0 for row in rows]
    first = read_metrics(cached, "train")[0]
    assert first["loss"] == pytest.approx(sum(0.5 if d else 0.75 for d in labels) / 4, abs=1e-6)
    assert first["kl"] == pytest.approx(0, abs=1e-5) and first["rewards/accuracies"] == 0 and "examples_per_s" in first
    assert first["fraction_desirable"] == pytest.approx(sum(labels) / 4)
    assert all(r["kl"] >= 0 for r in read_metrics(cached, "train"))  # clamped at 0 from below
    for a, b in zip(read_metrics(cached, "train"), read_metrics(live, "train")):
        for key in ("loss", "kl", "rewards/desirable", "rewards/undesirable", "rewards/accuracies"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    assert read_metrics(cached, "eval")[-1]["loss"] > 0


def test_a_pairwise_loss_on_unpaired_data_is_refused_naming_the_losses_that_fit(
    tiny_model_dir, unpaired_dir, tmp_path, capsys
):
    assert main(unpaired_train(tiny_model_dir, unpaired_dir, tmp_path / "run", "--max-steps", "1")) == 1
    err = capsys.readouterr().err
    assert "this data is unpaired" in err and "kto, apo_zero_unpaired, bco_unpaired" in err


def test_apo_zero_and_bco_unpaired_train_and_bco_starts_at_ln2(tiny_model_dir, unpaired_dir, tmp_path):
    for loss, start in (("apo_zero_unpaired", 0.5), ("bco_unpaired", math.log(2))):
        run = tmp_path / loss
        assert main(unpaired_train(tiny_model_dir, unpaired_dir, run, "--max-steps", "2", f"loss.name={loss}")) == 0
        records = read_metrics(run, "train")
        assert records[0]["loss"] == pytest.approx(start, abs=1e-6) and "kl" not in records[0]
        assert math.isfinite(records[1]["loss"])


@pytest.fixture(scope="session")
def unpaired_two_process_run(tiny_model_dir, unpaired_dir, tmp_path_factory) -> Path:
    """An uninterrupted `TWO_PROCESS_RUN` of KTO: what one process and a killed run must reproduce."""
    run = tmp_path_factory.mktemp("unpaired_two") / "run"
    run_dpokit_elsewhere(train_cli_args(tiny_model_dir, unpaired_dir, run, *TWO_PROCESS_RUN, "loss.name=kto"))
    return run


@pytest.mark.slow
def test_two_processes_equal_one_with_the_kl_estimate_over_both(
    tiny_model_dir, unpaired_dir, unpaired_two_process_run, tmp_path
):
    one = tmp_path / "one"
    assert main(train_cli_args(tiny_model_dir, unpaired_dir, one, *ONE_PROCESS_RUN, "loss.name=kto")) == 0
    a, b = read_metrics(one, "train"), read_metrics(unpaired_two_process_run, "train")
    assert len(a) == len(b) == 12 and any(r["kl"] > 0 for r in a)
    for r1, r2 in zip(a, b):
        for key in ("loss", "kl", "rewards/margins", "rewards/accuracies"):
            assert r2[key] == pytest.approx(r1[key], abs=1e-5), key


@pytest.mark.slow
def test_an_unpaired_run_killed_with_kill_9_resumes_to_the_uninterrupted_run(
    tiny_model_dir, unpaired_dir, unpaired_two_process_run, tmp_path
):
    import random
    import time

    cut = tmp_path / "cut"
    args = train_cli_args(tiny_model_dir, unpaired_dir, cut, *TWO_PROCESS_RUN, "loss.name=kto")
    process = start_train(args)
    deadline = time.monotonic() + 120
    while not list((cut / "checkpoints").glob("step_*")) and time.monotonic() < deadline:
        assert process.poll() is None, "train ended early"
        time.sleep(0.02)
    time.sleep(random.Random(2).uniform(0.0, 0.6))
    kill_launcher_and_workers(process, cut)
    assert process.returncode != 0, "the run finished before the kill landed; give it more steps"
    process = start_train([*args, "--resume"])
    wait_for_steps(cut, 1, process)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr[-2000:]
    losses = [r["loss"] for r in read_metrics(cut, "train")]
    assert losses == pytest.approx([r["loss"] for r in read_metrics(unpaired_two_process_run, "train")], abs=1e-6)


def test_cache_audit_of_an_unpaired_cache_gives_the_references_view_of_each_label(
    unpaired_dir, unpaired_cache, tmp_path, capsys
):
    out = tmp_path / "audit"
    assert main(["cache", "audit", str(unpaired_cache), "--out", str(out)]) == 0
    assert "AUC" in capsys.readouterr().out
    record = json.loads((out / "audit.json").read_text())
    cache, prepared = open_cache(unpaired_cache), load_prepared(unpaired_dir)
    for split in cache.splits:
        table = cache.logps(split)
        per_token = (table.logps.double() / table.tokens.double()).tolist()
        labels = [row["scores"][0] == 1.0 for row in prepared.split(split)]
        own, kl = per_token[0::2], per_token[1::2]
        good = [v for v, d in zip(own, labels) if d]
        bad = [v for v, d in zip(own, labels) if not d]
        summary = record["splits"][split]
        assert (summary["desirable"], summary["undesirable"]) == (len(good), len(bad))
        assert summary["per_token_logps"]["desirable"] == pytest.approx(sum(good) / len(good))
        wins = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
        assert summary["normalised_auc"] == pytest.approx(wins / (len(good) * len(bad)))
        assert summary["kl_completion_less_likely"] == pytest.approx(sum(k < o for k, o in zip(kl, own)) / len(own))
