"""`dpokit prepare` streams rows (read, tokenized and written a chunk at a time) and writes the same data as
an independent per-row computation: the same ids, the same eval rows, the same data fingerprint."""

from __future__ import annotations

import hashlib
import json
import math
import random
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pytest
import tiny
from conftest import tokenize_rows
from transformers import AutoTokenizer

from dpokit.data.formats import Record, normalise
from dpokit.data.pipeline import PrepareOptions, held_out_rows, run_prepare, tokenized_chunks, worker_pool
from dpokit.data.prepared import COLUMNS, arrow_files, features, load_prepared, pair_token_counts
from dpokit.data.tokenize import LengthLimits, PairTokenizer
from dpokit.fingerprint import numpy_view

ROWS = 300


def fingerprint_of_whole_columns(splits: dict[str, list[dict]]) -> str:
    """The data fingerprint as first defined: each column of each split concatenated in memory, then hashed."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        table = datasets.Dataset.from_list(splits[name]).data
        digest.update(name.encode())
        for column in COLUMNS:
            array = table.column(column).combine_chunks()
            digest.update(column.encode())
            digest.update(np.asarray(array.offsets).astype(np.int64).tobytes())
            digest.update(np.asarray(array.values).astype(np.int32).tobytes())
    return digest.hexdigest()


def held_out_as_a_list_shuffle(count: int, fraction: float, seed: int) -> set[int]:
    """The eval rows as `dpokit prepare` first chose them: a shuffled list of every index."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return set(order[: round(count * fraction)])


def percentile(values: list[int], q: int) -> int:
    """The smallest value that at least q% of `values` do not exceed."""
    return sorted(values)[math.ceil(len(values) * q / 100) - 1]


@pytest.fixture
def small_batches(monkeypatch):
    """Chunks of 16 pairs, record batches of 10 rows and split files of about 2 KB: a few hundred rows span
    many of each."""
    monkeypatch.setattr("dpokit.data.pipeline.CHUNK_SIZE", 16)
    monkeypatch.setattr("dpokit.data.prepared.WRITE_BATCH_ROWS", 10)
    monkeypatch.setattr("dpokit.data.prepared.SHARD_BYTES", 2000)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_streamed_output_equals_a_per_row_computation(tokenizer_dir, tmp_path, small_batches, num_proc):
    rows = tiny.preference_rows(ROWS, seed=3)
    source = [dict(row) for row in rows]
    for index in (5, 77, 250):  # skipped rows inside chunks: the row numbering of what is kept moves on
        source[index]["chosen"] = ""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in source))
    options = PrepareOptions(
        data=str(data), model=str(tokenizer_dir), out=tmp_path / "out", eval_fraction=0.2, seed=7, num_proc=num_proc
    )
    prepared = load_prepared(run_prepare(options))

    # Independently: the eval rows chosen among all rows read, skipped ones included, then every kept row
    # tokenized on its own with the chat template.
    eval_rows = held_out_as_a_list_shuffle(ROWS, 0.2, 7)
    ids = tokenize_rows(AutoTokenizer.from_pretrained(tokenizer_dir), rows)
    expected = {
        "train": [ids[i] for i in range(ROWS) if i not in eval_rows and i not in (5, 77, 250)],
        "eval": [ids[i] for i in sorted(eval_rows) if i not in (5, 77, 250)],
    }
    for name, split_rows in expected.items():
        written = prepared.split(name)
        assert [{c: row[c] for c in COLUMNS} for row in written] == split_rows, name
        assert len(arrow_files(prepared.path / name)) > 1  # the split spans several files, as in a large run
    assert prepared.fingerprint == fingerprint_of_whole_columns(expected)

    manifest = prepared.manifest
    assert manifest["counts"]["read"] == ROWS and manifest["counts"]["kept"] == ROWS - 3
    assert manifest["counts"]["dropped"] == {"empty_content": 3}
    assert manifest["counts"]["first_dropped"]["empty_content"] == f"{data} line 6: chosen is empty"
    kept = expected["train"] + expected["eval"]
    prompt = [len(row["prompt_ids"]) for row in kept]
    completion = [len(row[side]) for row in kept for side in ("chosen_ids", "rejected_ids")]
    for name, values in (("prompt", prompt), ("completion", completion)):
        assert manifest["lengths"][name] == {
            **{f"p{q}": percentile(values, q) for q in (50, 90, 99)},
            "max": max(values),
        }


def test_held_out_rows_are_those_a_shuffled_list_gives():
    for count, fraction, seed in ((10, 0.3, 0), (1000, 0.1, 42), (12_345, 0.05, 7)):
        mask = held_out_rows(count, fraction, seed)
        assert set(np.flatnonzero(mask).tolist()) == held_out_as_a_list_shuffle(count, fraction, seed)


def test_a_pool_is_given_only_a_few_chunks_ahead_of_the_rows_written(tokenizer_dir):
    pair_tokenizer = PairTokenizer(AutoTokenizer.from_pretrained(tokenizer_dir), LengthLimits(1024))
    pairs = [normalise(Record(f"row {i}", row), "auto", {}, None) for i, row in enumerate(tiny.preference_rows(40))]
    read = []

    def chunks():
        for pair in pairs:
            read.append(pair)
            yield [pair]

    with worker_pool(pair_tokenizer, 2) as pool:
        for taken, (chunk, ids) in enumerate(tokenized_chunks(chunks(), pair_tokenizer, pool, ahead=4), start=1):
            assert len(read) <= taken + 3  # the one taken back, and at most 3 more submitted
            assert ids == pair_tokenizer.tokenize(chunk)
    assert taken == 40


def test_a_split_written_in_several_files_is_named_as_save_to_disk_names_them_and_loads_whole(
    tokenizer_dir, tmp_path, small_batches
):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in tiny.preference_rows(200)))
    out = run_prepare(PrepareOptions(data=str(data), model=str(tokenizer_dir), out=tmp_path / "out"))
    files = arrow_files(out / "train")
    assert [f.name for f in files] == [f"data-{i:05d}-of-{len(files):05d}.arrow" for i in range(len(files))]
    assert len(datasets.load_from_disk(str(out / "train"))) == 200
    assert not list(tmp_path.glob(".out.tmp-*"))
    saved = tmp_path / "saved"  # what save_to_disk writes beside the data, for the same features
    datasets.Dataset.from_dict({c: [[1]] for c in COLUMNS}, features=features()).save_to_disk(str(saved))
    assert (out / "train" / "dataset_info.json").read_text() == (saved / "dataset_info.json").read_text()
    written, expected = (json.loads((folder / "state.json").read_text()) for folder in (out / "train", saved))
    assert {key: value for key, value in written.items() if key not in ("_data_files", "_fingerprint")} == {
        key: value for key, value in expected.items() if key not in ("_data_files", "_fingerprint")
    }


def test_rows_of_a_split_in_several_files_are_read_from_the_arrow_buffers_without_pandas(
    tokenizer_dir, tmp_path, small_batches
):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in tiny.preference_rows(200)))
    out = run_prepare(PrepareOptions(data=str(data), model=str(tokenizer_dir), out=tmp_path / "out"))
    split = load_prepared(out).split("train")
    assert len(split.table.column("chosen_ids").chunks) > 1
    rows = [0, 199, 57, 120, 3, 57]  # across chunks, out of order, one twice
    expected = split.table.take(rows).to_pydict()
    assert split[rows] == expected
    sliced = pa.array([[1, 2], [3], [4, 5, 6]], type=pa.list_(pa.int32())).slice(1)  # offsets start at 2
    assert numpy_view(sliced.offsets).tolist() == [2, 3, 6] and numpy_view(sliced.values).tolist() == [1, 2, 3, 4, 5, 6]
    counts = pair_token_counts(split)
    assert [c.tolist() for c in counts] == [[len(ids) for ids in split[name]] for name in COLUMNS]
    # pyarrow's own conversions import pandas (64 MiB of a training process): a batch and the lengths need none
    check = (
        f"import sys; from dpokit.data.prepared import load_prepared, pair_lengths; "
        f"s = load_prepared({str(out)!r}).split('train'); s[[0, 199]]; pair_lengths(s); "
        "assert 'pandas' not in sys.modules, 'imported pandas'"
    )
    subprocess.run([sys.executable, "-c", check], check=True)
