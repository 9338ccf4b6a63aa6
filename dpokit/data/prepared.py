"""The on-disk format of `dpokit prepare`: one Arrow dataset per split plus ``manifest.json``.

Layout::

    prepared/
      manifest.json       shape, source, counts, tokenizer fingerprint, lengths, data fingerprint, file digests
      train/              datasets.Dataset.save_to_disk; columns prompt_ids, chosen_ids, rejected_ids
      eval/               (optional) the same

``chosen_ids``/``rejected_ids`` hold the completion tokens only (the end-of-turn token included);
the full sequences are ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids``. Row ``i`` of a
split is example ``i`` in the reference cache and in training.

That is the ``pairs`` shape. Ranked data (the manifest's ``"shape": "ranked"``; a manifest without the
key is pairs) has the columns `RANKED_COLUMNS`: ``prompt_ids``, ``completion_ids`` (a row's k >= 2
completions, each as ``chosen_ids`` is) and ``scores`` (float32, one per completion, higher is better).

Unpaired data (``"shape": "unpaired"``, KTO's thumbs-up/down rows) has the same columns: ``completion_ids`` is
``[completion, kl_completion]`` (the row's own completion, then the completion of another row that `prepare`
fixed as its mismatched completion for KTO's KL estimate) and ``scores`` is ``[label, nan]`` (1.0 desirable,
0.0 undesirable; the KL completion has no label). Both are `GROUPED_SHAPES`: a group of completions behind one
prompt, cached and computed alike.

Pairs from data with scores (``score_chosen``/``score_rejected``) also have the float32 columns `SCORE_COLUMNS`
(``chosen_score``, ``rejected_score``; nan where a row has none); without them the files are as before.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from dpokit.artifacts import check_replaceable, replace_atomically
from dpokit.errors import DpokitError
from dpokit.fingerprint import data_fingerprint, ends_sha256, numpy_view

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
RANKED_COLUMNS = ("prompt_ids", "completion_ids", "scores")
SCORE_COLUMNS = ("chosen_score", "rejected_score")  # a pair's scores (float32, nan: none), when the data has them
GROUPED_SHAPES = ("ranked", "unpaired")  # stored as `RANKED_COLUMNS`: completions behind one prompt
WRITE_BATCH_ROWS = 1000  # rows per Arrow record batch that `SplitWriter` writes (save_to_disk's batch too)
SHARD_BYTES = 500 * 10**6  # a split file this large is closed and the next begun (save_to_disk's default shard size)


@dataclass
class PreparedData:
    """A loaded ``prepared/`` directory."""

    path: Path
    manifest: dict[str, Any]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["data_fingerprint"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    @property
    def shape(self) -> str:
        """``pairs``, ``ranked`` or ``unpaired`` (a manifest from before ranked data has no ``shape``: pairs)."""
        return self.manifest.get("shape", "pairs")

    @property
    def is_ranked(self) -> bool:
        return self.shape == "ranked"

    @property
    def is_unpaired(self) -> bool:
        return self.shape == "unpaired"

    @property
    def has_scores(self) -> bool:
        """Pairs stored with their scores (`SCORE_COLUMNS`)."""
        return self.manifest.get("scores") is not None

    @property
    def is_grouped(self) -> bool:
        """Stored as groups of completions (`RANKED_COLUMNS`): ranked or unpaired data."""
        return self.shape in GROUPED_SHAPES

    def split(self, name: str) -> "ArrowSplit":
        """Split `name`, memory-mapped (`ArrowSplit`: read with pyarrow alone, without importing `datasets`)."""
        import pyarrow as pa

        if name not in self.manifest["splits"]:
            raise DpokitError(
                f"{self.path}: no split {name!r}; it has {', '.join(self.splits)} "
                f"(re-run `dpokit prepare` with --eval-fraction or --eval-data for an eval split)"
            )
        try:
            tables = [pa.ipc.open_stream(pa.memory_map(str(file))).read_all() for file in arrow_files(self.path / name)]
            return ArrowSplit(pa.concat_tables(tables) if len(tables) != 1 else tables[0])
        except (OSError, pa.ArrowException) as exc:
            raise DpokitError(
                f"{self.path / name}: not a readable dataset ({one_line(exc)}); {remake_hint(self)}"
            ) from exc


class ArrowSplit:
    """A prepared split as a memory-mapped Arrow table, read the way a `datasets.Dataset` is (``split[i]``: a
    row; ``split[indices]`` or ``split[a:b]``: a dict of columns; ``split["prompt_ids"]``: a column; iteration:
    rows) without the `datasets` package, which costs a training process 60 MB and a second of imports.
    `to_dataset` gives the `datasets.Dataset` for writing."""

    def __init__(self, table):
        self.table = table
        self._buffers: dict[str, tuple] = {}  # column -> (row starts of its chunks, [(offsets, values) per chunk])

    @property
    def data(self):
        """The Arrow table (as `datasets.Dataset.data`: `fingerprint.data_fingerprint` reads its batches)."""
        return self.table

    @property
    def column_names(self) -> list[str]:
        return self.table.column_names

    @property
    def schema(self):
        return self.table.schema

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.table.column(key).to_pylist()
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self.table.slice(start, max(0, stop - start)).to_pydict()
            key = range(start, stop, step)
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"row {key} of a split of {len(self)}")
            return self.table.slice(index, 1).to_pylist()[0]
        rows = np.asarray(list(key), dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows {rows.min()}..{rows.max()} of a split of {len(self)}")
        return {name: self._lists(name, rows) for name in self.table.column_names}

    def _lists(self, name: str, rows: np.ndarray) -> list[list]:
        """Column `name`'s values at `rows`, sliced from the Arrow buffers by their offsets: a training batch of a
        few rows costs microseconds, where `Table.take(...).to_pydict()` cost milliseconds. A list of lists
        (``completion_ids``) is sliced by both levels of offsets."""
        if name not in self._buffers:
            chunks = self.table.column(name).chunks
            starts = np.cumsum([0] + [len(chunk) for chunk in chunks])
            self._buffers[name] = (starts, [list_buffers(chunk) for chunk in chunks])
        starts, buffers = self._buffers[name]
        which = np.searchsorted(starts, rows, side="right") - 1
        out = []
        for chunk, row in zip(which.tolist(), (rows - starts[which]).tolist()):
            levels, values = buffers[chunk]
            if not levels:  # a scalar column (a pair's score)
                out.append(values[row].item())
                continue
            offsets, *inner = levels
            if not inner:
                out.append(values[offsets[row] : offsets[row + 1]].tolist())
                continue
            bounds = inner[0][offsets[row] : offsets[row + 1] + 1].tolist()
            out.append([values[start:stop].tolist() for start, stop in zip(bounds, bounds[1:])])
        return out

    def __iter__(self):
        for batch in self.table.to_batches(max_chunksize=1024):
            yield from batch.to_pylist()

    def select(self, indices) -> "ArrowSplit":
        return ArrowSplit(self.table.take(np.asarray(indices, dtype=np.int64)))

    def to_dataset(self):
        """The same rows as a `datasets.Dataset` (in memory), for `write_prepared`."""
        import datasets

        return datasets.Dataset(self.table.combine_chunks())


def list_buffers(lists) -> tuple[list[np.ndarray], np.ndarray]:
    """An Arrow list array's offsets (one array per level of nesting) and its innermost values, as NumPy views."""
    offsets = []
    while hasattr(lists, "offsets"):
        offsets.append(numpy_view(lists.offsets))
        lists = lists.values
    return offsets, numpy_view(lists)


def shape_columns(shape: str, scores: bool = False) -> tuple[str, ...]:
    """The columns of a prepared split of `shape`: `COLUMNS` (pairs; with `scores`, `SCORE_COLUMNS` after them)
    or `RANKED_COLUMNS` (`GROUPED_SHAPES`)."""
    if shape in GROUPED_SHAPES:
        return RANKED_COLUMNS
    return COLUMNS + SCORE_COLUMNS if scores else COLUMNS


def load_prepared(path: str | os.PathLike) -> PreparedData:
    """Open a `dpokit prepare` output directory, checking that it is complete and its split files intact."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise DpokitError(f"prepared data {path} does not exist; create it with `dpokit prepare DATA --out {path}`")
    if not manifest_path.is_file():
        raise DpokitError(
            f"{path} has no {MANIFEST_NAME}: it is not a complete `dpokit prepare` output; prepare it again"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise DpokitError(f"{manifest_path}: not valid JSON ({exc}); prepare the data again") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DpokitError(
            f"{path}: prepared format version {version} is not supported (this dpokit reads {FORMAT_VERSION}); "
            "prepare the data again with this version"
        )
    for split in manifest.get("splits", {}):
        if not (path / split).is_dir():
            raise DpokitError(f"{path}: split {split!r} is listed in the manifest but missing on disk")
    prepared = PreparedData(path=path, manifest=manifest)
    check_split_files(prepared)
    return prepared


def remake_hint(prepared: PreparedData) -> str:
    """How to rebuild a damaged prepared directory."""
    source = prepared.manifest.get("source", "DATA")
    if isinstance(source, dict) and "scored" in source:  # `dpokit select`'s output
        return (
            f"re-create it with `dpokit select {source['scored']} --rule {source.get('rule')} --out {prepared.path} "
            "--overwrite` (and its other options)"
        )
    model = prepared.manifest.get("tokenizer", {}).get("name", "MODEL")
    return f"re-create it with `dpokit prepare {source} --model {model} --out {prepared.path} --overwrite` (and its other options)"


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def split_file_digests(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Size and a hash of both ends of every file in each split folder of a prepared `directory`.

    Keyed by the path relative to `directory` (``train/data-00000-of-00001.arrow``). Recorded in the
    manifest at write time, they let `load_prepared` find a truncated or damaged file without reading it.
    """
    directory = Path(directory)
    return {
        file.relative_to(directory).as_posix(): {"size": file.stat().st_size, "ends_sha256": ends_sha256(file)}
        for split in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        for file in sorted(split.rglob("*"))
        if file.is_file()
    }


def arrow_files(split_dir: Path) -> list[Path]:
    """The Arrow files of a `datasets.save_to_disk` folder: those its ``state.json`` lists, else ``*.arrow``."""
    try:
        listed = json.loads((split_dir / "state.json").read_text())["_data_files"]
        return [split_dir / entry["filename"] for entry in listed]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(p for p in split_dir.glob("*.arrow") if not p.name.startswith("cache-"))


def check_split_files(prepared: PreparedData) -> None:
    """Refuse split files that are not what `dpokit prepare` wrote (by the sizes and end hashes the manifest
    records in ``files``), naming the file and the fix."""
    path, manifest = prepared.path, prepared.manifest
    if not isinstance(manifest.get("files"), dict):
        raise DpokitError(f"{path / MANIFEST_NAME} records no split files; {remake_hint(prepared)}")
    for name, recorded in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise DpokitError(f"{file} is missing (listed in {path / MANIFEST_NAME}); {remake_hint(prepared)}")
        size = file.stat().st_size
        if size != recorded["size"]:
            raise DpokitError(
                f"{file} is {size} bytes but `dpokit prepare` wrote {recorded['size']} (truncated or changed since); "
                f"{remake_hint(prepared)}"
            )
        if ends_sha256(file) != recorded["ends_sha256"]:
            raise DpokitError(f"{file} has changed since `dpokit prepare` wrote it; {remake_hint(prepared)}")


def write_prepared(
    out_dir: str | os.PathLike, splits: dict[str, Any], manifest: dict[str, Any], overwrite: bool
) -> Path:
    """Write `datasets.Dataset` (or `ArrowSplit`) splits and the manifest as a prepared directory (`write_prepared_with`)."""

    def save(tmp: Path) -> dict[str, Any]:
        for name, dataset in splits.items():
            (dataset.to_dataset() if isinstance(dataset, ArrowSplit) else dataset).save_to_disk(str(tmp / name))
        return manifest

    return write_prepared_with(out_dir, save, overwrite)


def write_prepared_with(
    out_dir: str | os.PathLike, write_splits: Callable[[Path], dict[str, Any]], overwrite: bool
) -> Path:
    """Write a prepared directory to a temporary sibling, then rename it into place.

    `write_splits(tmp)` writes one folder per split into `tmp` (`dpokit prepare` streams rows there
    with `SplitWriter` as it tokenizes them) and returns the manifest; the format version, the data
    fingerprint (read back from those files a batch at a time: the columns of the manifest's ``shape``,
    a ranked split's scores included; a manifest without one gets the shape of the files' columns) and
    the file digests are added, and
    ``manifest.json`` is written last. An existing `out_dir` is replaced only with `overwrite` and
    only if it is an earlier prepare output (`dpokit.artifacts`). An interrupted run leaves only
    ``.{name}.tmp-*``, never a directory that `load_prepared` accepts.
    """
    check_replaceable(out_dir, "prepared", overwrite)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        manifest = write_splits(tmp)
        folders = [folder for folder in tmp.iterdir() if folder.is_dir() and not folder.name.startswith(".")]
        splits = {folder.name: split_batches(folder) for folder in folders}
        shape = manifest.get("shape") or written_shape(folders)
        full_manifest = dict(
            manifest,
            shape=shape,
            format_version=FORMAT_VERSION,
            data_fingerprint=data_fingerprint(splits, shape_columns(shape, written_scores(folders))),
            files=split_file_digests(tmp),
        )
        (tmp / MANIFEST_NAME).write_text(json.dumps(full_manifest, indent=2, sort_keys=False) + "\n")

    return replace_atomically(out_dir, "prepared", write)


def written_shape(folders: list[Path]) -> str:
    """``ranked`` when the split folders' Arrow files have a ``completion_ids`` column, else ``pairs``."""
    import pyarrow as pa

    for file in (file for folder in folders for file in arrow_files(folder)):
        with pa.OSFile(str(file)) as source:
            return "ranked" if "completion_ids" in pa.ipc.open_stream(source).schema.names else "pairs"
    return "pairs"


def written_scores(folders: list[Path]) -> bool:
    """Whether the split folders' Arrow files hold a pair's scores (`SCORE_COLUMNS`)."""
    import pyarrow as pa

    for file in (file for folder in folders for file in arrow_files(folder)):
        with pa.OSFile(str(file)) as source:
            return SCORE_COLUMNS[0] in pa.ipc.open_stream(source).schema.names
    return False


def split_batches(split_dir: Path) -> Callable[[], Iterator]:
    """A function that reads a split folder's Arrow files a record batch at a time.

    Read through plain file reads, not memory-mapped: a memory-mapped file's pages count in the
    process's resident memory once touched, and hashing touches all of them.
    """
    import pyarrow as pa

    def batches() -> Iterator:
        for file in arrow_files(split_dir):
            with pa.OSFile(str(file)) as source:
                yield from pa.ipc.open_stream(source)

    return batches


def features(shape: str = "pairs", scores: bool = False):
    """The `datasets.Features` of a prepared split: int32 id lists; for ranked data, ``completion_ids`` a list of
    them and ``scores`` a float32 list; for pairs with `scores`, float32 `SCORE_COLUMNS` too."""
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    if shape in GROUPED_SHAPES:
        return datasets.Features(
            {
                "prompt_ids": ids,
                "completion_ids": datasets.List(ids),
                "scores": datasets.List(datasets.Value("float32")),
            }
        )
    score = {column: datasets.Value("float32") for column in SCORE_COLUMNS} if scores else {}
    return datasets.Features({**{column: ids for column in COLUMNS}, **score})


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Give an OSError without a file name (pyarrow's: a full disk, a size limit) the name of the file being written,
    so that the command's one-line error says where (`dpokit.errors.filesystem_error_line`)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc


class SplitWriter:
    """Appends rows of token ids to a split folder, in the layout `datasets.Dataset.save_to_disk` writes.

    Rows are buffered `WRITE_BATCH_ROWS` at a time and written as Arrow record batches to
    ``data-NNNNN-of-NNNNN.arrow`` stream files (a new one after `SHARD_BYTES`, as save_to_disk shards),
    so `dpokit prepare` never holds a split in memory; `finish` adds ``state.json`` and
    ``dataset_info.json``, after which `datasets.load_from_disk` reads the folder as save_to_disk's own.
    `shape` picks the columns (`shape_columns`). Use it as a context manager: leaving it by an exception
    closes the file without finishing.
    """

    def __init__(self, directory: Path, shape: str = "pairs", scores: bool = False):
        self.directory = Path(directory)
        self.directory.mkdir()
        self.shape = shape
        self.scores = scores
        self.columns = shape_columns(shape, scores)
        self.schema = features(shape, scores).arrow_schema  # with the features in its metadata, as datasets writes it
        self.rows: dict[str, list[Sequence]] = {column: [] for column in self.columns}
        self.files: list[Path] = []
        self.sink: Any = None  # the open file and its Arrow stream writer
        self.stream: Any = None

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            self.close_file()
        except OSError:
            if exc is None:  # leaving by an exception already: that one is the report, not the file's close
                raise

    def add(self, *values: Sequence) -> None:
        """Append one row: a value per column, in `self.columns` order (prompt, chosen and rejected ids, and their
        scores when it has them; or prompt ids, the completions' ids and their scores)."""
        for column, value in zip(self.columns, values, strict=True):
            self.rows[column].append(value)
        if len(self.rows[self.columns[0]]) >= WRITE_BATCH_ROWS:
            self.write_batch()

    def write_batch(self) -> None:
        import pyarrow as pa

        if not self.rows[self.columns[0]]:
            return
        if self.stream is None or self.sink.tell() >= SHARD_BYTES:
            self.next_file()
        arrays = [pa.array(self.rows[column], type=self.schema.field(column).type) for column in self.columns]
        with naming(self.files[-1]):
            self.stream.write_batch(pa.record_batch(arrays, schema=self.schema))
        self.rows = {column: [] for column in self.columns}

    def next_file(self) -> None:
        import pyarrow as pa

        self.close_file()
        self.files.append(self.directory / f"data-{len(self.files):05d}.arrow")  # numbered "-of-N" by `finish`
        self.sink = pa.OSFile(str(self.files[-1]), "wb")
        self.stream = pa.ipc.new_stream(self.sink, self.schema)

    def close_file(self) -> None:
        if self.stream is not None:
            stream, sink, self.stream, self.sink = self.stream, self.sink, None, None
            with naming(self.files[-1]):
                stream.close()
                sink.close()

    def finish(self) -> None:
        """Write the buffered rows, close the last file, name the files and write the folder's metadata."""
        self.write_batch()
        if not self.files:
            self.next_file()  # an empty split is one file holding only the schema
        self.close_file()
        names = [f"data-{index:05d}-of-{len(self.files):05d}.arrow" for index in range(len(self.files))]
        for file, name in zip(self.files, names):
            file.rename(self.directory / name)
        state = {  # save_to_disk's for a dataset without a format or split
            "_data_files": [{"filename": name} for name in names],
            "_fingerprint": os.urandom(8).hex(),  # a fresh dataset's fingerprint is random too
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (self.directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        info = {
            "citation": "",
            "description": "",
            "features": features(self.shape, self.scores).to_dict(),
            "homepage": "",
            "license": "",
        }
        (self.directory / "dataset_info.json").write_text(json.dumps(info, indent=2))  # save_to_disk's, to the byte


def arrow_table(split):
    """The Arrow table of an `ArrowSplit` or a `datasets.Dataset`."""
    return split.table if isinstance(split, ArrowSplit) else split.with_format("arrow")


def pair_token_counts(split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token counts ``[N]`` (int64) of each pair's prompt, chosen and rejected, read from Arrow offsets."""
    import pyarrow.compute as pc

    arrow = arrow_table(split)
    return tuple(numpy_view(pc.list_value_length(arrow[name])).astype(np.int64) for name in COLUMNS)


def group_token_counts(split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token counts of a ranked split, read from Arrow offsets: each row's prompt ``[N]``, every completion
    ``[C]`` (row 0's completions first, then row 1's, ...) and each row's number of completions ``[N]``
    (int64 each; ``C = sizes.sum()``)."""
    import pyarrow.compute as pc

    arrow = arrow_table(split)
    completions = arrow["completion_ids"]
    prompt = numpy_view(pc.list_value_length(arrow["prompt_ids"])).astype(np.int64)
    sizes = numpy_view(pc.list_value_length(completions)).astype(np.int64)
    tokens = numpy_view(pc.list_value_length(pc.list_flatten(completions))).astype(np.int64)
    return prompt, tokens, sizes


def pair_lengths(split) -> np.ndarray:
    """An example's length, the one definition every batching rule uses: prompt plus its longest completion
    (the width of its rows in the padded layout), for a pair and a ranked row alike. ``[N]`` int64."""
    if "completion_ids" in split.column_names:
        prompt, tokens, sizes = group_token_counts(split)
        if not len(prompt):
            return prompt
        return prompt + np.maximum.reduceat(tokens, np.cumsum(sizes) - sizes)
    prompt, chosen, rejected = pair_token_counts(split)
    return prompt + np.maximum(chosen, rejected)
