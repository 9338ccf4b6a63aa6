"""Ranked data end to end: `prepare` -> `ref-logps` -> `train` on k completions per prompt.

The cache holds one value per completion, computed with the prompt once (equal to each completion's own forward),
resumes where it stopped, and is the same from two processes as from one; training from it starts where it should
(all-pairs DPO = ln 2 and Plackett-Luce = mean ln(k!) at step 1), equals a live reference step by step, resumes
exactly after a SIGTERM or kill -9, and two processes equal one.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ONE_PROCESS_RUN, TWO_PROCESS_RUN, run_dpokit_elsewhere, train_cli_args
from test_faults import kill_launcher_and_workers, start_train, wait_for_steps
from transformers import AutoModelForCausalLM

from dpokit.cli import main
from dpokit.data.collate import pad_pairs
from dpokit.data.loader import example_rows
from dpokit.data.prepared import load_prepared
from dpokit.logps import naive_sequence_logps
from dpokit.metrics import read_metrics
from dpokit.reference.cache import open_cache

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo" / "data" / "ranked.jsonl"


@pytest.fixture(scope="session")
def ranked_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The bundled ranked demo (k from 2 to 5, ties) prepared with the tiny model's template, with an eval split."""
    out = tmp_path_factory.mktemp("ranked") / "prepared"
    args = ["prepare", str(DEMO), "--model", str(tiny_model_dir), "--out", str(out), "--eval-fraction", "0.2"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def ranked_cache(tiny_model_dir, ranked_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ranked_cache") / "ref.h5"
    args = ["ref-logps", str(ranked_dir), "--model", str(tiny_model_dir), "--out", str(path), "--batch-size", "3"]
    assert main(args + ["--per-token"]) == 0
    return path


def own_logps(model_dir: Path, split) -> tuple[np.ndarray, np.ndarray]:
    """Every completion's log-prob (and token count) from the model's own full logits, one group at a time."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    values, counts = [], []
    for i in range(len(split)):
        batch = pad_pairs(example_rows(split, [i]), [i], pad_id=0)
        with torch.no_grad():
            values += naive_sequence_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask).tolist()
        counts += batch.completion_mask[:, 1:].sum(1).tolist()
    return np.array(values), np.array(counts)


def test_the_cache_holds_each_completions_own_logps_with_the_prompt_computed_once(
    tiny_model_dir, ranked_dir, ranked_cache
):
    cache = open_cache(ranked_cache)
    prepared = load_prepared(ranked_dir)
    assert cache.is_ranked and prepared.is_ranked and cache.splits == ["train", "eval"]
    for split in cache.splits:
        data = prepared.split(split)
        table = cache.logps(split)
        sizes = [len(row["completion_ids"]) for row in example_rows(data, list(range(len(data))))]
        assert np.diff(table.group_offsets.numpy()).tolist() == sizes and cache.rows[split] == len(data)
        expected, counts = own_logps(tiny_model_dir, data)
        np.testing.assert_allclose(table.logps.numpy(), expected, atol=1e-4, rtol=0)
        assert table.tokens.numpy().tolist() == counts.tolist()
        # --per-token: each completion's token log-probs sum to its value
        offsets = table.token_offsets.numpy()
        sums = [table.token_logps[offsets[c] : offsets[c + 1]].sum() for c in range(len(expected))]
        np.testing.assert_allclose(sums, table.logps.numpy(), atol=1e-4)
        outputs = table.select(torch.tensor([2, 0]))
        assert outputs.group_sizes == (sizes[2], sizes[0])
        assert outputs.token_mask.sum(1).tolist() == outputs.tokens.tolist()


def test_an_interrupted_ranked_pass_resumes_filling_only_the_missing_groups(
    tiny_model_dir, ranked_dir, ranked_cache, crash_cache_writer, tmp_path
):
    out = tmp_path / "ref.h5"
    args = ["ref-logps", str(ranked_dir), "--model", str(tiny_model_dir), "--out", str(out), "--batch-size", "2"]
    restore = crash_cache_writer(after_rows=6)  # completion rows: a few groups' worth
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args + ["--per-token"])
    restore()
    partial = open_cache(out)
    assert 0 < partial.rows_done["train"] < partial.rows["train"]
    # A group is whole or absent: its completions are written in one commit.
    with h5py.File(out, "r") as handle:
        done, offsets = handle["train/done"][()], handle["train/group_offsets"][()]
    for g in range(len(offsets) - 1):
        assert len(set(done[offsets[g] : offsets[g + 1]].tolist())) == 1
    assert main(args + ["--per-token"]) == 0
    resumed, whole = open_cache(out), open_cache(ranked_cache)
    for split in whole.splits:
        a, b = resumed.logps(split), whole.logps(split)
        np.testing.assert_allclose(a.logps.numpy(), b.logps.numpy(), atol=1e-5)
        np.testing.assert_allclose(a.token_logps.numpy(), b.token_logps.numpy(), atol=1e-5)


@pytest.mark.slow
def test_two_processes_write_the_same_ranked_cache_as_one(tiny_model_dir, ranked_dir, ranked_cache, tmp_path):
    out = tmp_path / "ref.h5"
    args = ["ref-logps", str(ranked_dir), "--model", str(tiny_model_dir), "--out", str(out), "--batch-size", "3"]
    run_dpokit_elsewhere([*args, "--per-token", "--gpus", "2"])
    two, one = open_cache(out), open_cache(ranked_cache)
    for split in one.splits:
        a, b = two.logps(split), one.logps(split)
        assert torch.equal(a.group_offsets, b.group_offsets) and torch.equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logps.numpy(), b.logps.numpy(), atol=1e-5)
        np.testing.assert_allclose(a.token_logps.numpy(), b.token_logps.numpy(), atol=1e-5)


def test_cache_verify_recomputes_ranked_completions(ranked_cache, capsys):
    assert main(["cache", "verify", str(ranked_cache), "--sample", "5"]) == 0
    assert "ok" in capsys.readouterr().out


def ranked_train(tiny_model_dir, ranked_dir, run_dir, *extra) -> list[str]:
    return train_cli_args(tiny_model_dir, ranked_dir, run_dir, "data.batch_size=4", "data.shuffle=false", *extra)


def first_batch_groups(ranked_dir: Path, size: int = 4) -> list[dict]:
    split = load_prepared(ranked_dir).split("train")
    return example_rows(split, list(range(size)))


def test_all_pairs_dpo_starts_at_ln2_from_the_cache_and_equals_the_live_reference(
    tiny_model_dir, ranked_dir, ranked_cache, tmp_path
):
    cached, live = tmp_path / "cached", tmp_path / "live"
    steps = ["--max-steps", "3", "--lr", "1e-3", "training.eval_at_start=true", "eval.samples=0"]
    assert main(ranked_train(tiny_model_dir, ranked_dir, cached, *steps, f"reference.cache={ranked_cache}",
                             "reference.source=cache")) == 0  # fmt: skip
    assert main(ranked_train(tiny_model_dir, ranked_dir, live, *steps)) == 0
    first = read_metrics(cached, "train")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # every pair's rewards are 0 at step 1
    assert first["rewards/accuracies"] == 0 and first["rewards/ndcg"] > 0 and "groups_per_s" in first
    start = read_metrics(cached, "eval")[0]  # before any update: the reference's own ranking is all ties
    assert start["rewards/margins"] == pytest.approx(0, abs=1e-5)
    for a, b in zip(read_metrics(cached, "train"), read_metrics(live, "train")):
        for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/ndcg", "logps/best"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_plackett_luce_starts_at_the_mean_log_k_factorial(tiny_model_dir, ranked_dir, ranked_cache, tmp_path):
    run = tmp_path / "run"
    args = ["--max-steps", "1", f"reference.cache={ranked_cache}", "reference.source=cache", "loss.name=plackett_luce"]
    assert main(ranked_train(tiny_model_dir, ranked_dir, run, *args)) == 0
    groups = first_batch_groups(ranked_dir)

    def log_factorials(scores) -> float:  # Breslow's ties: each completion's denominator is its level and below
        return sum(math.log(sum(s <= score for s in scores)) for score in scores)

    expected = sum(log_factorials(g["scores"]) for g in groups) / len(groups)
    assert read_metrics(run, "train")[0]["loss"] == pytest.approx(expected, abs=1e-5)
    assert any(len(set(g["scores"])) < len(g["scores"]) for g in groups)  # the batch has ties


def test_each_pairing_rule_and_a_pairwise_loss_train_on_ranked_data(tiny_model_dir, ranked_dir, tmp_path):
    for rule, loss in (("best_worst", "nca"), ("best_rest", "simpo"), ("adjacent", "dpo")):
        run = tmp_path / rule
        args = ["--max-steps", "2", f"loss.pairs={rule}", f"loss.name={loss}", "loss.gap_weighted=true"]
        assert main(ranked_train(tiny_model_dir, ranked_dir, run, *args)) == 0
        records = read_metrics(run, "train")
        assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)


def test_a_listwise_loss_on_pair_data_is_refused_naming_the_key(train_cli, tmp_path, capsys):
    assert main(train_cli(tmp_path / "run", "--max-steps", "1", "loss.pairs=all")) == 1
    assert "loss.pairs applies to ranked data" in capsys.readouterr().err


@pytest.fixture(scope="session")
def ranked_two_process_run(tiny_model_dir, ranked_dir, tmp_path_factory) -> Path:
    """An uninterrupted `TWO_PROCESS_RUN` on ranked groups: what one process and a killed run must reproduce."""
    run = tmp_path_factory.mktemp("ranked_two") / "run"
    run_dpokit_elsewhere(train_cli_args(tiny_model_dir, ranked_dir, run, *TWO_PROCESS_RUN))
    return run


@pytest.mark.slow
def test_two_processes_equal_one_on_ranked_groups(tiny_model_dir, ranked_dir, ranked_two_process_run, tmp_path):
    one = tmp_path / "one"
    assert main(train_cli_args(tiny_model_dir, ranked_dir, one, *ONE_PROCESS_RUN)) == 0
    a, b = read_metrics(one, "train"), read_metrics(ranked_two_process_run, "train")
    assert len(a) == len(b) == 12
    for r1, r2 in zip(a, b):
        for key in ("loss", "rewards/accuracies", "rewards/ranking_accuracy", "rewards/ndcg"):
            assert r2[key] == pytest.approx(r1[key], abs=1e-4), key


@pytest.mark.slow
def test_a_ranked_run_killed_with_kill_9_resumes_to_the_uninterrupted_run(
    tiny_model_dir, ranked_dir, ranked_two_process_run, tmp_path
):
    import random
    import time

    cut = tmp_path / "cut"
    process = start_train(train_cli_args(tiny_model_dir, ranked_dir, cut, *TWO_PROCESS_RUN))
    deadline = time.monotonic() + 120
    while not list((cut / "checkpoints").glob("step_*")) and time.monotonic() < deadline:
        assert process.poll() is None, "train ended early"
        time.sleep(0.02)
    time.sleep(random.Random(1).uniform(0.0, 0.6))
    kill_launcher_and_workers(process, cut)
    assert process.returncode != 0, "the run finished before the kill landed; give it more steps"
    process = start_train(train_cli_args(tiny_model_dir, ranked_dir, cut, *TWO_PROCESS_RUN, "--resume"))
    wait_for_steps(cut, 1, process)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr[-2000:]
    losses = [r["loss"] for r in read_metrics(cut, "train")]
    assert losses == pytest.approx([r["loss"] for r in read_metrics(ranked_two_process_run, "train")], abs=1e-6)


def test_the_manifest_records_k_and_the_demo_has_ties_and_k_from_2_to_5(ranked_dir):
    manifest = json.loads((ranked_dir / "manifest.json").read_text())
    assert manifest["shape"] == "ranked"
    rows = example_rows(load_prepared(ranked_dir).split("train"), list(range(manifest["splits"]["train"]["rows"])))
    sizes = Counter(len(r["completion_ids"]) for r in rows)
    assert min(sizes) == 2 and max(sizes) == 5
    assert any(len(set(r["scores"])) < len(r["scores"]) for r in rows)


def test_cache_audit_of_a_ranked_cache_gives_the_references_ranking_computed_by_hand(
    ranked_dir, ranked_cache, tmp_path, capsys
):
    out = tmp_path / "audit"
    assert main(["cache", "audit", str(ranked_cache), "--out", str(out), "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "(ranked" in printed
    record = json.loads((out / "audit.json").read_text())
    assert record["shape"] == "ranked"
    cache, prepared = open_cache(ranked_cache), load_prepared(ranked_dir)
    for split in cache.splits:
        table = cache.logps(split)
        rows = list(prepared.split(split))
        offsets, logps = table.group_offsets.tolist(), table.logps.tolist()
        right = ordered = in_order = 0
        for g, row in enumerate(rows):
            values, scores = logps[offsets[g] : offsets[g + 1]], row["scores"]
            pairs = [(i, j) for i in range(len(scores)) for j in range(len(scores)) if scores[i] > scores[j]]
            good = sum(values[i] > values[j] for i, j in pairs)
            right, ordered, in_order = (
                right + good,
                ordered + len(pairs),
                in_order + (bool(pairs) and good == len(pairs)),
            )
        summary = record["splits"][split]
        assert summary["groups"] == len(rows) and summary["scored_pairs"] == ordered
        assert summary["pair_accuracy"] == pytest.approx(right / ordered)
        assert summary["groups_in_order"] == pytest.approx(in_order / len(rows))
        assert summary["k"]["max"] == max(len(r["scores"]) for r in rows)
        assert all(entry["margin"] < 0 for entry in summary["disagreements"]) and len(summary["disagreements"]) <= 3
    filtered = ["--write-filtered", str(tmp_path / "clean"), "--drop", "identical"]
    assert main(["cache", "audit", str(ranked_cache), "--out", str(out), *filtered]) == 1
    assert "--write-filtered reads pair caches only so far" in capsys.readouterr().err
