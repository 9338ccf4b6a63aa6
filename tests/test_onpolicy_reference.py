"""The reference cache from the sampler: `dpokit sample --ref-logps` computes each completion's log-prob under the
model that samples it, `dpokit score` carries the values through, and `dpokit select` writes the reference cache of
the data it selects. Compared with an independent computation: `dpokit ref-logps` on the same prepared data."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import tiny
from conftest import run_dpokit_elsewhere, train_cli_args

from dpokit.cli import main
from dpokit.data.prepared import load_prepared
from dpokit.fingerprint import reference_fingerprint
from dpokit.metrics import read_metrics
from dpokit.reference.cache import IDENTITY_ATTRS, open_cache

SAMPLE_FLAGS = ("--k", 3, "--max-new-tokens", 8, "--batch-size", 2, "--seed", 3)


def sample(prompts: Path, model: Path, out: Path, *flags) -> int:
    return main(["sample", str(prompts), "--model", str(model), "--out", str(out), *map(str, flags)])


def select(scored: Path, out: Path, *flags) -> int:
    return main(["select", str(scored), "--out", str(out), *map(str, flags)])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cache_arrays(path: Path) -> dict[str, dict[str, np.ndarray]]:
    with h5py.File(path, "r") as handle:
        return {split: {name: group[name][()] for name in group} for split, group in handle.items()}


@pytest.fixture(scope="module")
def prompts_txt(tmp_path_factory) -> Path:
    """Six prompts: three batches of 2."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("".join(row["prompt"] + "\n" for row in tiny.preference_rows(6)))
    return path


@pytest.fixture(scope="module")
def samples(tiny_model_dir, prompts_txt, tmp_path_factory) -> Path:
    """Samples of the tiny model with their reference log-probs (the tiny model is the reference)."""
    out = tmp_path_factory.mktemp("samples") / "samples"
    assert sample(prompts_txt, tiny_model_dir, out, *SAMPLE_FLAGS, "--ref-logps") == 0
    return out


@pytest.fixture(scope="module")
def plain_samples(tiny_model_dir, prompts_txt, tmp_path_factory) -> Path:
    """The same samples without --ref-logps."""
    out = tmp_path_factory.mktemp("plain_samples") / "samples"
    assert sample(prompts_txt, tiny_model_dir, out, *SAMPLE_FLAGS) == 0
    return out


@pytest.fixture(scope="module")
def scored(samples, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scored") / "scored"
    assert main(["score", str(samples), "--scorer", "scorers:completion_length", "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------------------------
# sample and score


def test_sampled_records_carry_each_completions_log_prob_and_the_manifest_what_a_cache_claims(
    samples, plain_samples, tiny_model_dir
):
    records = read_jsonl(samples / "samples.jsonl")
    for record in records:
        assert len(record["ref_logps"]) == 3 and all(value < 0 for value in record["ref_logps"])
        assert record["ref_tokens"] == [len(ids) for ids in record["completion_ids"]]
    # the forward changes nothing the sampler draws: the samples are those of a run without the flag
    plain = read_jsonl(plain_samples / "samples.jsonl")
    assert [r["completion_ids"] for r in records] == [r["completion_ids"] for r in plain]
    assert "ref_logps" not in plain[0]

    reference = json.loads((samples / "manifest.json").read_text())["ref_logps"]
    assert reference["reference_fingerprint"] == reference_fingerprint(tiny_model_dir)
    assert (reference["dtype"], reference["attn_implementation"]) == ("float32", "sdpa")  # ref-logps's defaults on CPU
    assert reference["layout"] == "packed + prefix-shared" and reference["per_token"] is False
    assert json.loads((plain_samples / "manifest.json").read_text())["ref_logps"] is None


def test_score_carries_the_reference_values_through_unchanged(samples, scored):
    for before, after in zip(read_jsonl(samples / "samples.jsonl"), read_jsonl(scored / "scored.jsonl")):
        assert after == {**before, "scores": after["scores"]}
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (samples, scored)]
    assert manifests[1]["ref_logps"] == manifests[0]["ref_logps"]


# ----------------------------------------------------------------------------------------------
# select: the cache equals what ref-logps computes, and train and cache verify take it


@pytest.mark.parametrize(("rule", "extra"), [("best_worst", ("--eval-fraction", 0.34)), ("all", ())])
def test_select_writes_the_cache_ref_logps_would_and_train_starts_from_it_at_ln2(
    rule, extra, samples, scored, tiny_model_dir, tmp_path
):
    prepared = tmp_path / "prepared"
    assert select(scored, prepared, "--rule", rule, *extra) == 0
    sampled = tmp_path / "prepared-ref.h5"  # the default: next to the prepared folder
    live = tmp_path / "live.h5"
    assert main(["ref-logps", str(prepared), "--model", str(tiny_model_dir), "--out", str(live)]) == 0

    ours, theirs = open_cache(sampled), open_cache(live)
    for key in (*IDENTITY_ATTRS, "shape", "prepared", "model", "checked_layout"):
        assert ours.attrs[key] == theirs.attrs[key], key
    assert ours.attrs["sampled_from"] == str(samples.resolve())
    assert ours.rows == theirs.rows and ours.rows_done == ours.rows
    expected = cache_arrays(live)
    for split, arrays in cache_arrays(sampled).items():
        for name, values in arrays.items():
            if name.endswith("logps"):
                np.testing.assert_allclose(values, expected[split][name], rtol=0, atol=1e-4, err_msg=name)
            elif name != "row_crc":  # the checksums of values a float's last bit apart differ
                np.testing.assert_array_equal(values, expected[split][name], err_msg=name)
    assert json.loads((prepared / "manifest.json").read_text())["source"]["ref_cache"] == str(sampled.resolve())

    assert main(["cache", "verify", str(sampled)]) == 0
    run = tmp_path / "run"
    args = train_cli_args(tiny_model_dir, prepared, run, "--max-steps", 1, "reference.source=cache",
                          f"reference.cache={sampled}")  # fmt: skip
    assert main(args) == 0
    assert read_metrics(run, "train")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # DPO at the reference


@pytest.mark.parametrize("rule", ["best_random", "rso"])
def test_each_cached_pair_holds_the_sampled_values_of_its_chosen_and_rejected_completions(rule, scored, tmp_path):
    prepared = tmp_path / "prepared"
    assert select(scored, prepared, "--rule", rule, "--rso-samples", 2) == 0
    records = read_jsonl(scored / "scored.jsonl")
    cache = cache_arrays(tmp_path / "prepared-ref.h5")["train"]
    rows = list(load_prepared(prepared).split("train"))
    assert len(rows) == len(cache["chosen_logps"]) > 0
    for i, row in enumerate(rows):
        record = next(r for r in records if r["prompt_ids"] == row["prompt_ids"])
        for side in ("chosen", "rejected"):
            j = record["completion_ids"].index(row[f"{side}_ids"])
            assert cache[f"{side}_logps"][i] == np.float32(record["ref_logps"][j])  # copied, not recomputed
            assert cache[f"{side}_tokens"][i] == record["ref_tokens"][j]


def test_select_writes_the_cache_where_ref_cache_says_and_replaces_one_only_with_overwrite(scored, tmp_path, capsys):
    cache = tmp_path / "caches" / "mine.h5"
    cache.parent.mkdir()
    assert select(scored, tmp_path / "prepared", "--ref-cache", cache) == 0
    assert open_cache(cache).is_complete("train") and not (tmp_path / "prepared-ref.h5").exists()
    assert select(scored, tmp_path / "other", "--ref-cache", cache) == 1
    assert f"{cache} already exists; pass --overwrite" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()  # refused before anything is written
    assert select(scored, tmp_path / "prepared", "--rule", "all", "--ref-cache", cache, "--overwrite") == 0
    assert open_cache(cache).is_ranked


def test_ref_cache_without_reference_values_in_the_records_is_refused(scored, tmp_path, capsys):
    plain = tmp_path / "scored"
    shutil.copytree(scored, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    (plain / "manifest.json").write_text(json.dumps({**manifest, "ref_logps": None}))
    assert select(plain, tmp_path / "prepared", "--ref-cache", tmp_path / "ref.h5") == 1
    error = capsys.readouterr().err
    assert "carry no reference log-probs; sample with --ref-logps" in error
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "ref.h5").exists()
    assert select(plain, tmp_path / "prepared") == 0  # without the flag: prepared data alone
    assert not (tmp_path / "prepared-ref.h5").exists()


# ----------------------------------------------------------------------------------------------
# resuming and several processes


def test_toggling_ref_logps_on_an_existing_samples_folder_is_refused(
    samples, plain_samples, tiny_model_dir, prompts_txt, capsys
):
    assert sample(prompts_txt, tiny_model_dir, samples, *SAMPLE_FLAGS) == 1
    assert "was sampled with other settings: --ref-logps differs (it was True, now False)" in capsys.readouterr().err
    assert sample(prompts_txt, tiny_model_dir, plain_samples, *SAMPLE_FLAGS, "--ref-logps") == 1
    assert "--ref-logps differs (it was False, now True)" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_write_the_same_samples_and_reference_values_as_one(
    samples, tiny_model_dir, prompts_txt, tmp_path
):
    out = tmp_path / "samples"
    run_dpokit_elsewhere(["sample", str(prompts_txt), "--model", str(tiny_model_dir), "--out", str(out),
                          *map(str, SAMPLE_FLAGS), "--ref-logps", "--gpus", "2"])  # fmt: skip
    assert (out / "samples.jsonl").read_bytes() == (samples / "samples.jsonl").read_bytes()
    manifests = [json.loads((folder / "manifest.json").read_text()) for folder in (out, samples)]
    assert manifests[0]["ref_logps"] == manifests[1]["ref_logps"]
