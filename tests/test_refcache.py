"""The HDF5 reference cache: fingerprints, the resumable writer, the reader the trainer uses."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

from dpokit.errors import DpokitError
from dpokit.fingerprint import reference_fingerprint, weights_fingerprint
from dpokit.reference.cache import RefCacheWriter, cache_attrs, create_or_resume_cache, open_cache

WEIGHTS = "model.safetensors"


def write_attrs(**changes) -> dict:
    attrs = cache_attrs(
        model="/models/tiny",
        weights="w" * 64,
        adapter=None,
        adapter_weights=None,
        prepared_path="/data/prepared",
        data_fingerprint="d" * 64,
        tokenizer_fingerprint="t" * 64,
        dtype="float32",
    )
    return {**attrs, **changes}


def fill(path: Path, split: str, rows: np.ndarray) -> None:
    """Write rows with recognisable values: logps -index, tokens index+1."""
    RefCacheWriter(path).write(split, rows, -rows.astype(np.float32), -2 * rows.astype(np.float32), rows + 1, rows + 2)


# ----------------------------------------------------------------------------------------------
# fingerprints


def test_weights_fingerprint_changes_when_one_weight_element_changes(tiny_model_dir, tmp_path):
    changed = tiny.copy_model_with_changed_weight(tiny_model_dir, tmp_path / "changed")
    assert weights_fingerprint(changed) != weights_fingerprint(tiny_model_dir)


def test_weights_fingerprint_changes_when_one_element_of_one_matrix_row_changes(tiny_model_dir, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(tiny_model_dir, edited)
    tensors = load_file(edited / WEIGHTS)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] += 1e-3
    save_file(tensors, edited / WEIGHTS, metadata={"format": "pt"})
    assert weights_fingerprint(edited) != weights_fingerprint(tiny_model_dir)


def test_weights_fingerprint_sees_one_element_of_a_large_matrix(tmp_path):
    # Every byte is hashed: an edit in a row that a strided sample of a 1024 x 1024 matrix would skip
    # (the old fingerprint read every 16th row) still changes the fingerprint.
    for name in ("base", "edited"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"model_type": "llama"}')
    weight = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file({"w": weight}, tmp_path / "base" / WEIGHTS)
    edited = weight.clone()
    edited[3, 5] += 1
    save_file({"w": edited}, tmp_path / "edited" / WEIGHTS)
    assert weights_fingerprint(tmp_path / "base") != weights_fingerprint(tmp_path / "edited")


def test_weights_fingerprint_ignores_copying_identical_resaving_and_unrelated_files(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert weights_fingerprint(copy) == weights_fingerprint(tiny_model_dir)
    # save_file writes the same tensors with the same metadata to the same bytes
    save_file(load_file(copy / WEIGHTS), copy / WEIGHTS, metadata={"format": "pt"})
    (copy / "README.md").write_text("a model card")
    torch.save({"learning_rate": 1e-5}, copy / "training_args.bin")  # a Trainer checkpoint's, not weights
    assert weights_fingerprint(copy) == weights_fingerprint(tiny_model_dir)


def test_weights_fingerprint_changes_when_the_same_weights_are_stored_differently(tiny_model_dir, tmp_path):
    # The fingerprint is of the files as stored, not of the tensors they decode to.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    save_file(load_file(copy / WEIGHTS), copy / WEIGHTS, metadata={"format": "pt", "note": "re-saved"})
    assert weights_fingerprint(copy) != weights_fingerprint(tiny_model_dir)


def test_weights_fingerprint_of_bin_weights_changes_with_a_weight(tmp_path):
    for name, value in (("a", 1.0), ("b", 1.0), ("c", 1.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"model_type": "llama"}')
        torch.save({"w": torch.full((8, 8), value)}, tmp_path / name / "pytorch_model.bin")
    assert weights_fingerprint(tmp_path / "a") == weights_fingerprint(tmp_path / "b")
    assert weights_fingerprint(tmp_path / "a") != weights_fingerprint(tmp_path / "c")


def test_weights_fingerprint_of_a_directory_without_weights_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DpokitError, match="no weight files"):
        weights_fingerprint(tmp_path)


def test_reference_fingerprint_depends_on_the_adapter(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    save_file({"lora_A": torch.ones(4, 4)}, adapter / "adapter_model.safetensors")
    assert reference_fingerprint(tiny_model_dir) == weights_fingerprint(tiny_model_dir)
    assert reference_fingerprint(tiny_model_dir, adapter) != reference_fingerprint(tiny_model_dir)


# ----------------------------------------------------------------------------------------------
# writing and reading


def test_new_cache_has_every_split_with_nothing_done(tmp_path):
    cache = create_or_resume_cache(tmp_path / "ref.h5", write_attrs(), {"train": 5, "eval": 2}, overwrite=False)
    assert cache.splits == ["train", "eval"]
    assert cache.rows == {"train": 5, "eval": 2} and cache.rows_done == {"train": 0, "eval": 0}
    assert cache.pending_rows("train").tolist() == [0, 1, 2, 3, 4]
    with h5py.File(tmp_path / "ref.h5") as handle:
        assert handle["train/chosen_logps"].dtype == np.float32
        assert handle["train/chosen_tokens"].dtype == np.int32
        assert handle["train/done"].dtype == bool
        assert handle.attrs["data_fingerprint"] == "d" * 64


def test_rows_are_written_by_example_index_in_any_order(tmp_path):
    path = tmp_path / "ref.h5"
    create_or_resume_cache(path, write_attrs(), {"train": 5}, overwrite=False)
    fill(path, "train", np.array([3, 0, 4]))
    fill(path, "train", np.array([2, 1]))
    logps = open_cache(path).logps("train")
    assert logps.chosen_logps.tolist() == [0.0, -1.0, -2.0, -3.0, -4.0]
    assert logps.rejected_logps.tolist() == [0.0, -2.0, -4.0, -6.0, -8.0]
    assert logps.chosen_tokens.tolist() == [1, 2, 3, 4, 5] and logps.chosen_tokens.dtype == torch.long
    outputs = logps.select(torch.tensor([4, 1]))
    assert outputs.chosen_logps.tolist() == [-4.0, -1.0] and outputs.rejected_tokens.tolist() == [6, 3]


def test_reading_an_unfinished_split_names_it_and_the_command_to_finish(tmp_path):
    path = tmp_path / "ref.h5"
    create_or_resume_cache(path, write_attrs(), {"train": 5, "eval": 2}, overwrite=False)
    fill(path, "train", np.array([0, 1]))
    cache = open_cache(path)
    assert cache.rows_done == {"train": 2, "eval": 0}
    assert cache.pending_rows("train").tolist() == [2, 3, 4]
    with pytest.raises(
        DpokitError, match=r"'train' has 2/5 rows done.*dpokit ref-logps /data/prepared --model /models/tiny"
    ):
        cache.logps("train")
    with pytest.raises(DpokitError, match="no split 'test'"):
        cache.logps("test")


def test_resuming_with_the_same_inputs_keeps_written_rows(tmp_path):
    path = tmp_path / "ref.h5"
    create_or_resume_cache(path, write_attrs(), {"train": 5}, overwrite=False)
    fill(path, "train", np.array([1, 3]))
    resumed = create_or_resume_cache(path, write_attrs(created="later"), {"train": 5}, overwrite=False)
    assert resumed.pending_rows("train").tolist() == [0, 2, 4]
    assert resumed.attrs["created"] != "later"  # the file is the original one


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"data_fingerprint": "e" * 64}, "data_fingerprint differs (the prepared data)"),
        ({"weights_fingerprint": "x" * 64}, "weights_fingerprint differs (the reference model's weights)"),
        ({"adapter_fingerprint": "a" * 64}, "adapter_fingerprint differs (the reference adapter): none in the file"),
        ({"tokenizer_fingerprint": "u" * 64}, "tokenizer_fingerprint differs"),
        ({"dtype": "bfloat16"}, "dtype differs (the compute dtype): float32 in the file, bfloat16 now"),
    ],
)
def test_resuming_with_other_inputs_is_refused_naming_what_differs(tmp_path, changes, named):
    path = tmp_path / "ref.h5"
    create_or_resume_cache(path, write_attrs(), {"train": 5}, overwrite=False)
    with pytest.raises(DpokitError) as error:
        create_or_resume_cache(path, write_attrs(**changes), {"train": 5}, overwrite=False)
    assert named in str(error.value) and "--overwrite" in str(error.value)
    assert len(str(error.value).split("differs")) == 2  # only what differs is named


def test_overwrite_replaces_a_cache_made_from_other_inputs(tmp_path):
    path = tmp_path / "ref.h5"
    create_or_resume_cache(path, write_attrs(), {"train": 5}, overwrite=False)
    fill(path, "train", np.arange(5))
    fresh = create_or_resume_cache(path, write_attrs(data_fingerprint="e" * 64), {"train": 3}, overwrite=True)
    assert fresh.rows == {"train": 3} and fresh.rows_done == {"train": 0}
    assert fresh.attrs["data_fingerprint"] == "e" * 64
    assert not list(tmp_path.glob(".ref.h5.tmp-*"))


def test_check_matches_names_the_fingerprint_that_differs_and_how_to_rebuild(tmp_path):
    path = tmp_path / "ref.h5"
    create_or_resume_cache(path, write_attrs(), {"train": 1}, overwrite=False)
    cache = open_cache(path)
    cache.check_matches(data_fingerprint="d" * 64, reference_fingerprint="w" * 64, tokenizer_fingerprint="t" * 64)
    with pytest.raises(DpokitError) as error:
        cache.check_matches(data_fingerprint="d" * 64, reference_fingerprint="r" * 64)
    message = str(error.value)
    assert "reference_fingerprint differs" in message and "data_fingerprint" not in message
    assert f"--out {path} --overwrite" in message


def test_opening_a_missing_or_corrupt_cache_says_how_to_build_it(tmp_path):
    with pytest.raises(DpokitError, match="does not exist; build it with `dpokit ref-logps"):
        open_cache(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")  # never offered to --overwrite: ref-logps would refuse it
    with pytest.raises(
        DpokitError, match=r"not a reference cache \(not an HDF5 file\).*remove it yourself, then rebuild it"
    ):
        open_cache(tmp_path / "junk.h5")


def test_a_cache_that_does_not_record_what_it_was_computed_from_is_refused(tmp_path):
    path = tmp_path / "ref.h5"
    create_or_resume_cache(path, write_attrs(), {"train": 2}, overwrite=False)
    with h5py.File(path, "r+") as handle:
        del handle.attrs["attn_implementation"]  # no default is guessed for it
    with pytest.raises(DpokitError, match=r"does not record attn_implementation .*rebuild it with `dpokit ref-logps"):
        open_cache(path)


def test_a_writer_that_fails_mid_run_leaves_exactly_its_committed_rows_done(tmp_path, crash_cache_writer):
    path = tmp_path / "ref.h5"
    create_or_resume_cache(path, write_attrs(), {"train": 6}, overwrite=False)
    crash_cache_writer(after_rows=4)
    writer = RefCacheWriter(path)
    writer.write("train", np.array([0, 1]), *[np.zeros(2)] * 4)
    with pytest.raises(RuntimeError, match="simulated crash after 4 rows"):
        writer.write("train", np.array([2, 3]), *[np.zeros(2)] * 4)
    assert open_cache(path).rows_done == {"train": 4}


def test_a_steps_batches_from_every_rank_commit_as_one_write_with_their_token_values(tmp_path):
    from dpokit.reference.compute import BatchLogps, concatenated

    path = tmp_path / "ref.h5"
    chosen, rejected = np.array([2, 1, 3, 1, 2]), np.array([1, 2, 1, 3, 1])
    create_or_resume_cache(path, write_attrs(per_token=True), {"train": 5}, False, {"train": chosen + rejected})
    tokens = [np.arange(n, dtype=np.float32) + 10 * row for row, n in enumerate(chosen + rejected)]

    def batch(rows):  # one rank's outputs for example indices `rows`, as the pass gathers them
        rows = np.array(rows)
        return BatchLogps(
            rows,
            -rows.astype(np.float32),
            -2 * rows.astype(np.float32),
            chosen[rows],
            rejected[rows],
            num_tokens=1,
            token_logps=[tokens[i] for i in rows],
        )

    writer = RefCacheWriter(path)
    step = concatenated([batch([4, 1]), batch([3, 0])])
    writer.write(
        "train",
        step.index,
        step.chosen_logps,
        step.rejected_logps,
        step.chosen_tokens,
        step.rejected_tokens,
        step.token_logps,
    )
    assert writer.rows_written == 4 and open_cache(path).pending_rows("train").tolist() == [2]
    values = open_cache(path).logps("train", require_done=False)
    assert values.chosen_logps.tolist()[:2] == [0.0, -1.0] and values.chosen_logps.tolist()[3:] == [-3.0, -4.0]
    for row in (0, 1, 3, 4):
        start, end = values.token_offsets[row], values.token_offsets[row + 1]
        np.testing.assert_array_equal(values.token_logps.numpy()[start:end], tokens[row])
    assert np.isnan(values.token_logps.numpy()[values.token_offsets[2] : values.token_offsets[3]]).all()


def test_a_flipped_bit_in_a_written_row_is_caught_when_the_cache_is_read(ref_cache, tmp_path):
    cache = tmp_path / "ref.h5"
    shutil.copy(ref_cache, cache)
    clean = open_cache(cache).logps("train")  # every row matches its checksum
    with h5py.File(cache, "r+") as handle:
        values = handle["train/chosen_logps"]
        row = values[3:4].view(np.uint32)
        values[3] = (row ^ np.uint32(1 << 30)).view(np.float32)[0]  # one exponent bit: -2.2 becomes a tiny number
    with pytest.raises(DpokitError, match=r"split 'train' rows 3 do not match the checksums written with them"):
        open_cache(cache).logps("train")
    assert clean.chosen_logps.shape[0] > 3
