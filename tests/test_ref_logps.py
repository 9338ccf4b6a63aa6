"""`dpokit ref-logps` end to end: cached log-probs equal the live computation, resume, refusal, info, verify."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import h5py
import numpy as np
import pytest
import tiny
import torch
from conftest import assert_cache_equals, live_logps, naive_token_values, ref_logps_args
from transformers import AutoModelForCausalLM

from dpokit.cli import main
from dpokit.data.prepared import load_prepared, write_prepared
from dpokit.fingerprint import reference_fingerprint
from dpokit.reference.cache import open_cache

ROW_NAMES = ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens", "done")

# `dpokit ref-logps` in a process that SIGKILLs itself in the middle of the commit that reaches ROWS rows:
# values flushed, `done` written, the file not closed.
KILLED_MID_COMMIT = """
import os, signal, sys
from dpokit.cli import main
from dpokit.reference.cache import RefCacheWriter

rows, mark_done = int(sys.argv[1]), RefCacheWriter.mark_done

def mark_done_then_die(self, group, index):
    mark_done(self, group, index)
    if self.rows_written >= rows:
        os.kill(os.getpid(), signal.SIGKILL)

RefCacheWriter.mark_done = mark_done_then_die
sys.exit(main(sys.argv[2:]))
"""


def read_datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as handle:
        return {f"{split}/{name}": handle[split][name][()] for split in handle for name in ROW_NAMES}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model gains nothing from threads, and on a busy 2-core machine they slow it down ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def live(tiny_model_dir, prepared_dir):
    return live_logps(tiny_model_dir, prepared_dir)


def other_prepared(prepared_dir: Path, out: Path) -> Path:
    """The fixture's prepared data with one completion token changed."""
    prepared = load_prepared(prepared_dir)
    splits = {name: prepared.split(name) for name in prepared.splits}
    rows = list(splits["train"])
    rows[0]["chosen_ids"] = rows[0]["chosen_ids"][:-1] + [rows[0]["chosen_ids"][-1] + 1]
    splits["train"] = datasets.Dataset.from_list(rows)
    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    return write_prepared(out, splits, manifest, overwrite=False)


# ----------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("bucket", [True, False], ids=["bucketed", "index-order"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_cached_logps_equal_live_computation(tiny_model_dir, prepared_dir, tmp_path, live, batch_size, bucket):
    out = tmp_path / "ref.h5"
    extra = ["--batch-size", str(batch_size)] + ([] if bucket else ["--no-bucket"])
    assert main(ref_logps_args(prepared_dir, tiny_model_dir, out, *extra)) == 0
    assert_cache_equals(out, live)


def test_cached_logps_with_adapter_equal_live_adapter_model(tiny_model_dir, prepared_dir, adapter_dir, tmp_path, live):
    out = tmp_path / "ref.h5"
    assert (
        main(ref_logps_args(prepared_dir, tiny_model_dir, out, "--adapter", str(adapter_dir), "--batch-size", "3")) == 0
    )
    expected = live_logps(tiny_model_dir, prepared_dir, adapter_dir)
    assert_cache_equals(out, expected)
    assert np.abs(expected["train"]["chosen_logps"] - live["train"]["chosen_logps"]).max() > 1e-2  # the adapter matters
    cache = open_cache(out)
    assert cache.attrs["adapter"] == str(adapter_dir.resolve())
    cache.check_matches(reference_fingerprint=reference_fingerprint(tiny_model_dir, adapter_dir))


def test_cache_records_what_it_was_made_from(ref_cache, tiny_model_dir, prepared_dir):
    cache = open_cache(ref_cache)
    prepared = load_prepared(prepared_dir)
    assert cache.attrs["model"] == str(tiny_model_dir.resolve())
    assert cache.attrs["dtype"] == "float32" and cache.attrs["format_version"] == 1
    assert cache.attrs["checked_layout"] == "packed + prefix-shared"  # what its pass checked against the model's logits
    cache.check_matches(
        data_fingerprint=prepared.fingerprint,
        reference_fingerprint=reference_fingerprint(tiny_model_dir),
        tokenizer_fingerprint=prepared.tokenizer_fingerprint,
    )


def test_splits_option_computes_only_those_splits_and_a_rerun_adds_the_rest(
    tiny_model_dir, prepared_dir, tmp_path, live
):
    out = tmp_path / "ref.h5"
    assert main(ref_logps_args(prepared_dir, tiny_model_dir, out, "--splits", "eval")) == 0
    assert open_cache(out).rows_done == {"train": 0, "eval": 8}
    assert main(ref_logps_args(prepared_dir, tiny_model_dir, out, "--splits", "train")) == 0
    assert_cache_equals(out, live)


def test_unknown_split_is_an_error_naming_the_splits(tiny_model_dir, prepared_dir, tmp_path, capsys):
    assert main(ref_logps_args(prepared_dir, tiny_model_dir, tmp_path / "ref.h5", "--splits", "test")) == 1
    assert "no split 'test'; it has train, eval" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# interruption and reruns


def test_resumed_run_fills_only_rows_not_done(tiny_model_dir, prepared_dir, tmp_path, crash_cache_writer, live):
    out = tmp_path / "ref.h5"
    args = ref_logps_args(prepared_dir, tiny_model_dir, out, "--batch-size", "4")
    undo = crash_cache_writer(after_rows=8)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args)
    undo()
    written = np.flatnonzero(open_cache(out).done_mask("train"))
    assert len(written) == 8
    with h5py.File(out, "r+") as handle:  # mark a written row: a resumed run must not recompute it
        set_row_value(handle["train"], "chosen_logps", written[0], 123.0)
    assert main(args) == 0
    logps = open_cache(out).logps("train")
    assert float(logps.chosen_logps[written[0]]) == 123.0
    expected = copy.deepcopy(live)
    expected["train"]["chosen_logps"][written[0]] = 123.0
    assert_cache_equals(out, expected)


@pytest.mark.slow
def test_killed_run_resumes_and_ends_identical_to_an_uninterrupted_run(tiny_model_dir, prepared_dir, tmp_path):
    killed = tmp_path / "killed.h5"
    args = ref_logps_args(prepared_dir, tiny_model_dir, killed, "--batch-size", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", KILLED_MID_COMMIT, "12", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert open_cache(killed).rows_done == {"train": 12, "eval": 0}
    assert main(args) == 0
    uninterrupted = tmp_path / "uninterrupted.h5"
    assert main(ref_logps_args(prepared_dir, tiny_model_dir, uninterrupted, "--batch-size", "4")) == 0
    killed_values, uninterrupted_values = read_datasets(killed), read_datasets(uninterrupted)
    assert killed_values.keys() == uninterrupted_values.keys()
    for key in killed_values:
        np.testing.assert_array_equal(killed_values[key], uninterrupted_values[key], err_msg=key)


def test_rerun_on_other_data_is_refused_until_overwrite(tiny_model_dir, prepared_dir, ref_cache, tmp_path, capsys):
    out = tmp_path / "ref.h5"
    out.write_bytes(ref_cache.read_bytes())
    other = other_prepared(prepared_dir, tmp_path / "other")
    assert main(ref_logps_args(other, tiny_model_dir, out)) == 1
    err = capsys.readouterr().err
    assert "data_fingerprint differs (the prepared data)" in err and "Pass --overwrite" in err
    assert "weights_fingerprint" not in err
    assert main(ref_logps_args(other, tiny_model_dir, out, "--overwrite")) == 0
    assert open_cache(out).attrs["data_fingerprint"] == load_prepared(other).fingerprint


@pytest.mark.parametrize("flags", [[], ["--overwrite"]], ids=["resume", "overwrite"])
def test_out_naming_a_directory_is_one_line_and_leaves_no_temporary(
    tiny_model_dir, prepared_dir, tmp_path, capsys, flags
):
    out = tmp_path / "caches"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(ref_logps_args(prepared_dir, tiny_model_dir, out, *flags)) == 1
    err = capsys.readouterr().err
    assert (
        f"--out {out} is a directory; the reference cache is one file: give a file path such as {out / 'ref.h5'}" in err
    )
    assert len(err.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["caches"] and [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("flags", [[], ["--overwrite"]], ids=["resume", "overwrite"])
def test_a_file_that_is_not_a_cache_is_never_replaced(tiny_model_dir, prepared_dir, tmp_path, capsys, flags):
    out = tmp_path / "ref.h5"
    out.write_text("my notes, not a cache\n")
    assert main(ref_logps_args(prepared_dir, tiny_model_dir, out, *flags)) == 1
    err = capsys.readouterr().err
    assert f"refusing to replace {out}: it is not a dpokit reference cache (it is not an HDF5 file)" in err
    assert len(err.strip().splitlines()) == 1
    assert out.read_text() == "my notes, not a cache\n" and [p.name for p in tmp_path.iterdir()] == ["ref.h5"]


def test_overwrite_refuses_an_hdf5_file_that_dpokit_did_not_write(tiny_model_dir, prepared_dir, tmp_path, capsys):
    out = tmp_path / "ref.h5"
    with h5py.File(out, "w") as handle:
        handle["activations"] = np.arange(3)
    assert main(ref_logps_args(prepared_dir, tiny_model_dir, out, "--overwrite")) == 1
    assert "its HDF5 root attributes lack format_version, data_fingerprint" in capsys.readouterr().err
    with h5py.File(out, "r") as handle:
        assert handle["activations"][()].tolist() == [0, 1, 2]


def test_rerun_with_another_model_is_refused_naming_the_weights(
    tiny_model_dir, prepared_dir, ref_cache, tmp_path, capsys
):
    out = tmp_path / "ref.h5"
    out.write_bytes(ref_cache.read_bytes())
    changed = tiny.copy_model_with_changed_weight(tiny_model_dir, tmp_path / "changed")
    assert main(ref_logps_args(prepared_dir, changed, out)) == 1
    err = capsys.readouterr().err
    assert "weights_fingerprint differs (the reference model's weights)" in err and "data_fingerprint" not in err


def test_rerun_of_a_finished_cache_computes_nothing(ref_cache, prepared_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ref.h5"
    out.write_bytes(ref_cache.read_bytes())
    assert main(ref_logps_args(prepared_dir, tiny_model_dir, out)) == 0
    assert "0 new / 32" in capsys.readouterr().out
    before, after = read_datasets(ref_cache), read_datasets(out)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


# ----------------------------------------------------------------------------------------------
# cache info and verify


def test_cache_info_shows_rows_model_and_dtype(ref_cache, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["cache", "info", str(ref_cache)]) == 0
    out = capsys.readouterr().out
    assert "32/32 (complete)" in out and "8/8 (complete)" in out
    assert str(tiny_model_dir.resolve()) in out and "float32" in out and "created" in out


def test_cache_info_shows_an_unfinished_split(tiny_model_dir, prepared_dir, tmp_path, capsys):
    out = tmp_path / "ref.h5"
    assert main(ref_logps_args(prepared_dir, tiny_model_dir, out, "--splits", "eval")) == 0
    capsys.readouterr()
    assert main(["cache", "info", str(out)]) == 0
    assert "0/32 (incomplete)" in capsys.readouterr().out


def test_cache_verify_passes_on_a_good_cache(ref_cache, prepared_dir, tiny_model_dir, capsys):
    args = ["cache", "verify", str(ref_cache), str(prepared_dir), "--model", str(tiny_model_dir), "--sample", "32"]
    assert main(args) == 0
    assert ": ok" in capsys.readouterr().out


def test_cache_verify_fails_on_a_tampered_cache(ref_cache, prepared_dir, tiny_model_dir, tmp_path, capsys):
    tampered = tmp_path / "tampered.h5"
    tampered.write_bytes(ref_cache.read_bytes())
    with h5py.File(tampered, "r+") as handle:  # a wrong value with a matching checksum: only recomputing finds it
        set_row_value(handle["eval"], "rejected_logps", 5, handle["eval/rejected_logps"][5] + 0.5)
    args = ["cache", "verify", str(tampered), str(prepared_dir), "--model", str(tiny_model_dir), "--sample", "40"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out
    assert "largest difference 0.5 at eval row 5 (rejected) exceeds the tolerance 0.0001" in captured.err


def test_cache_verify_takes_the_data_model_and_tolerance_the_cache_records(ref_cache, tmp_path, capsys):
    assert main(["cache", "verify", str(ref_cache), "--sample", "8"]) == 0
    assert "(tolerance 0.0001): ok" in capsys.readouterr().out
    as_bf16 = tmp_path / "bf16.h5"  # a cache made in bf16 gets bf16's tolerance
    as_bf16.write_bytes(ref_cache.read_bytes())
    with h5py.File(as_bf16, "r+") as handle:
        handle.attrs["dtype"] = "bfloat16"
    main(["cache", "verify", str(as_bf16), "--sample", "8"])
    assert "(tolerance 0.1)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# per-token reference values (--per-token)


def test_per_token_cache_holds_every_completion_tokens_logp_and_resumes(
    tiny_model_dir, prepared_dir, tmp_path, crash_cache_writer, live
):
    out = tmp_path / "ref.h5"
    args = ref_logps_args(prepared_dir, tiny_model_dir, out, "--per-token", "--batch-size", "4")
    undo = crash_cache_writer(after_rows=8)  # killed mid-pass: the rest is filled by the rerun
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args)
    undo()
    assert main(args) == 0
    assert_cache_equals(out, live)
    cache = open_cache(out)
    assert cache.attrs["per_token"] and "--per-token" in cache.rebuild_command()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for split in ("train", "eval"):
        rows = list(load_prepared(prepared_dir).split(split))
        token_logps, _, _ = naive_token_values(model, rows)
        cached = cache.logps(split).select(torch.arange(len(rows)))
        for i in range(len(rows)):
            for side, offset in (("chosen", 0), ("rejected", len(rows))):
                got = getattr(cached, f"{side}_token_logps")[i][getattr(cached, f"{side}_token_mask")[i]]
                torch.testing.assert_close(got, token_logps[offset + i], atol=1e-4, rtol=0, msg=f"{split} {i} {side}")


def test_a_sequence_cache_is_not_silently_extended_with_per_token_values(
    tiny_model_dir, prepared_dir, ref_cache, tmp_path, capsys
):
    out = tmp_path / "ref.h5"
    out.write_bytes(ref_cache.read_bytes())
    assert main(ref_logps_args(prepared_dir, tiny_model_dir, out, "--per-token")) == 1
    assert (
        "per_token differs (per-token log-probs (--per-token)): False in the file, True now" in capsys.readouterr().err
    )


def test_per_token_values_cost_four_bytes_a_token(tiny_model_dir, prepared_dir, ref_cache, tmp_path):
    out = tmp_path / "ref.h5"
    assert main(ref_logps_args(prepared_dir, tiny_model_dir, out, "--per-token")) == 0
    prepared = load_prepared(prepared_dir)
    tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for s in prepared.splits for r in prepared.split(s))
    rows = sum(len(prepared.split(s)) for s in prepared.splits)
    assert out.stat().st_size - ref_cache.stat().st_size == pytest.approx(4 * tokens + 8 * (rows + 2), abs=4096)


def test_a_batch_size_of_zero_is_refused_before_any_file_is_written(tiny_model_dir, prepared_dir, tmp_path, capsys):
    out = tmp_path / "ref.h5"
    assert (
        main(["ref-logps", str(prepared_dir), "--model", str(tiny_model_dir), "--out", str(out), "--batch-size", "0"])
        == 1
    )
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no cache, no lock


def test_a_second_writer_through_a_symlink_meets_the_same_lock(tiny_model_dir, prepared_dir, tmp_path, capsys):
    from dpokit.lock import WriterLock, lock_path

    real, link = tmp_path / "ref.h5", tmp_path / "link.h5"
    link.symlink_to(real)
    with WriterLock(lock_path(real), "reference cache"):  # a writer of ref.h5 in progress (this process)
        assert main(["ref-logps", str(prepared_dir), "--model", str(tiny_model_dir), "--out", str(link)]) == 1
    assert "is being written by another dpokit process" in capsys.readouterr().err
    assert not real.exists()


def set_row_value(group, name: str, row: int, value: float) -> None:
    """Change one cached value and its row's checksum, as a cache built from other weights would hold it."""
    from dpokit.reference.cache import ROW_CRC, ROW_DATASETS, row_checksums

    group[name][row] = value
    columns = {column: group[column][row : row + 1] for column in ROW_DATASETS}
    group[ROW_CRC][row] = row_checksums(columns)[0]


def test_a_garbage_lock_file_is_named_and_left_alone(tiny_model_dir, prepared_dir, tmp_path, capsys):
    out = tmp_path / "ref.h5"
    garbage = tmp_path / "ref.h5.lock"
    garbage.write_text("not json at all")
    assert main(["ref-logps", str(prepared_dir), "--model", str(tiny_model_dir), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "ref.h5.lock is in the way of reference cache" in err and "is not a dpokit lock" in err
    assert garbage.read_text() == "not json at all" and not out.exists()
