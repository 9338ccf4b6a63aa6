"""Load preference rows from files or a dataset name and normalise each to chat messages.

Data comes in one of three shapes (`detect_shape`): pairs, ranked rows or unpaired rows. A pair row becomes a
`Pair` of message lists (``prompt``, ``chosen``, ``rejected``), each message ``{"role": ..., "content": ...}``.
Three input formats of pairs are recognised:

* ``plain``: ``prompt``, ``chosen`` and ``rejected`` are strings (the prompt becomes one user turn,
  each response one assistant turn);
* ``conversational``: ``prompt`` is a list of messages, ``chosen``/``rejected`` lists of assistant
  messages;
* ``implicit``: no ``prompt``; ``chosen``/``rejected`` are whole conversations (message lists, or
  Anthropic HH text ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) whose shared turns are the prompt.

A ranked row (k completions of one prompt, each with a score, higher is better) becomes a `Ranked`
(`normalise_ranked`): generic ``prompt`` + ``completions`` + ``scores`` (or completions as objects carrying
their score), UltraFeedback's ``instruction`` + ``completions[].overall_score``, or Nectar's HH-text
``prompt`` + ``answers[].rank`` (rank 1 best). A completion without a usable score or content is left out
and counted; a row left without a preference (fewer than 2 completions, all tied) is skipped.

An unpaired row (KTO's shape: one completion of a prompt with a thumbs-up or thumbs-down ``label``) becomes
an `Unpaired` (`normalise_unpaired`): ``prompt`` and ``completion`` as text or message lists, ``label`` true
or false (also 1/0 and ``"true"``/``"false"``). A null label skips the row, counted as ``missing_label``.

Rows are read lazily (`open_records`): JSONL and CSV a line at a time, Parquet `PARQUET_BATCH_ROWS`
rows at a time, a JSON array an item at a time (its text is held, not its rows), so `dpokit prepare`
never holds a source's rows in memory.

A row that cannot be used (empty or non-string content, identical responses, ...) raises
`SkippedRow` with a reason; the pipeline counts it. Problems with the input as a whole (an
unreadable file, a missing column, a score that is not a number, a label that is not true or false) raise
`DpokitError`.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import itertools
import json
import lzma
import math
import numbers
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from dpokit.errors import DpokitError

FORMATS = ("auto", "plain", "conversational", "implicit", "ranked", "unpaired")
COLUMNS = ("prompt", "chosen", "rejected")
PAIR_SCORE_COLUMNS = ("score_chosen", "score_rejected")  # optional scores of a pair (UltraFeedback-binarized's)
SYSTEM_COLUMN = "system"  # a row's own system prompt (Intel/orca_dpo_pairs', jondurbin/truthy-dpo's)
RANKED_COLUMNS = ("prompt", "completions", "scores")
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
# --column-map targets of each shape; ``score`` names the score's key inside completion objects.
COLUMN_MAP_TARGETS = {
    "pairs": COLUMNS + (SYSTEM_COLUMN,) + PAIR_SCORE_COLUMNS,
    "ranked": RANKED_COLUMNS + ("score", SYSTEM_COLUMN),
    "unpaired": UNPAIRED_COLUMNS + (SYSTEM_COLUMN,),
}
ALL_COLUMN_MAP_TARGETS = tuple(dict.fromkeys(target for targets in COLUMN_MAP_TARGETS.values() for target in targets))
LABEL_TEXTS = {"true": True, "false": False, "1": True, "0": False}  # a label given as text (a CSV cell), lowercased
COMPLETION_TEXT_KEYS = ("text", "completion", "response", "content", "answer")  # a completion object's text
COMPLETION_SCORE_KEYS = ("score", "overall_score", "rank")  # its score (``rank``: 1 is best, see `ranked_scores`)
HH_OPEN_REPLY = re.compile(r"\n\nAssistant:\s*$")  # the reply to write, at the end of a Nectar prompt
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
TEXT_SUFFIXES = (".json", ".jsonl", ".csv")  # those that may also come compressed
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # suffix -> opener (a text file's)
SPLIT_WORDS = ("train", "test", "validation", "valid", "dev", "eval")  # a file or folder of these names is that split
SHARD_NAME = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")  # the hub's `train_prefs-00000-of-00001`
SPLIT_SLICE = re.compile(r"^(?P<name>[^\[\]]*)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")  # what JSON allows between tokens (narrower than str.isspace)
PARQUET_BATCH_ROWS = 1024  # rows decoded from a Parquet file at a time


@dataclass
class Record:
    """One source row and where it came from (``data.jsonl line 7``), for error messages."""

    location: str
    row: dict[str, Any]


@dataclass
class Pair:
    """A normalised preference pair: the prompt and both completions as message lists."""

    location: str
    format: str
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    scores: Optional[tuple[float, float]] = None  # (chosen's, rejected's) from the data's score columns; nan: none


@dataclass
class Ranked:
    """A normalised ranked row: the prompt, k >= 2 completions as message lists and their scores (higher is
    better; float32 values, so that ties are the ties training sees)."""

    location: str
    format: str
    prompt: list[dict[str, str]]
    completions: list[list[dict[str, str]]]
    scores: list[float]
    names: list[str] = field(default_factory=list)  # each completion's place in the source, ``completions[3]``
    completions_dropped: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail) of those left out


@dataclass
class Unpaired:
    """A normalised unpaired row (KTO's): the prompt, one completion as message lists, and its label (True:
    desirable, thumbs-up; False: undesirable)."""

    location: str
    format: str
    prompt: list[dict[str, str]]
    completion: list[dict[str, str]]
    label: bool


class SkippedRow(Exception):
    """A row that is left out of the prepared data; `reason` is the manifest's count key.

    `completions_dropped`: a ranked row's completions left out before the row itself was, (reason, detail) each.
    """

    def __init__(self, reason: str, detail: str, completions_dropped: tuple[tuple[str, str], ...] = ()):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.completions_dropped = list(completions_dropped)


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class RecordSource:
    """The rows of some files or of a loaded dataset, read lazily: each iteration reads them afresh,
    one at a time, so a pass to count them and one pass per split hold no more than a row.

    `window`: the slice of the files' rows a split like ``train[:10%]`` asks for, as (start, stop) texts
    (`SplitSpec`); resolved against the rows' count on first use."""

    files: list[Path]
    dataset: Any = None  # a `datasets.Dataset` (memory-mapped Arrow), for a dataset name
    label: str = ""  # a dataset's row locations start with it: ``name[split]``
    window: Optional[tuple[Optional[str], Optional[str]]] = None
    _bounds: Optional[tuple[int, int]] = None  # the window as row numbers, once counted

    def __iter__(self) -> Iterator[Record]:
        if self.dataset is not None:
            return (Record(f"{self.label} row {index}", row) for index, row in enumerate(self.dataset))
        records = (record for file in self.files for record in file_records(file))
        if self.window is None:
            return records
        return itertools.islice(records, *self.bounds())

    def count(self) -> int:
        """How many rows there are: a dataset's length, a Parquet file's metadata, else a pass that parses
        every row (so malformed JSON or CSV stops the run before any tokenizing)."""
        if self.dataset is not None:
            return len(self.dataset)
        if self.window is not None:
            start, stop = self.bounds()
            return stop - start
        return self.files_rows()

    def files_rows(self) -> int:
        return sum(
            parquet_rows(file) if file.suffix.lower() == ".parquet" else sum(1 for _ in file_records(file))
            for file in self.files
        )

    def bounds(self) -> tuple[int, int]:
        """The window as (start, stop) row numbers of the files' rows, as `datasets` resolves ``[a:b]`` and
        ``[a%:b%]`` (negative values count from the end; percentages round to the closest row)."""
        if self._bounds is None:
            total = self.files_rows()
            start, stop = (slice_bound(text, total, default) for text, default in zip(self.window, (0, total)))
            self._bounds = (start, max(start, stop))
        return self._bounds


@dataclass(frozen=True)
class SplitSpec:
    """A split as `datasets` writes it: a name and an optional slice, ``train_prefs[:1000]``, ``test[10%:20%]``."""

    name: str
    start: Optional[str] = None
    stop: Optional[str] = None
    sliced: bool = False

    @classmethod
    def parse(cls, text: str, flag: str = "--split") -> "SplitSpec":
        match = SPLIT_SLICE.match(text.strip())
        if match is None:
            raise DpokitError(
                f"{flag} {text!r} is not a split name with an optional slice, as datasets writes it "
                "(train, train[:1000], train[10%:20%], test[-100:])"
            )
        return cls(match["name"], match["start"], match["stop"], "[" in text)


def slice_bound(text: Optional[str], total: int, default: int) -> int:
    """One end of a split's slice as a row number in ``0..total``: ``10``, ``-10`` (from the end) or ``10%``."""
    if text is None:
        return default
    value = int(round(float(text[:-1]) * total / 100)) if text.endswith("%") else int(text)
    return min(total, max(0, value + total if value < 0 else value))


def open_records(
    data: str, split: Optional[str] = None, subset: Optional[str] = None, default: str = "train"
) -> RecordSource:
    """The rows of a local file, a folder of files, or a dataset name for `datasets.load_dataset`.

    `split` (`default` when None) picks a split, optionally sliced (`SplitSpec`): of a dataset by name, of a
    folder whose files are named by split (`file_split`: the hub's ``data/train_prefs-00000-of-00001.parquet``,
    Anthropic HH's ``helpful-base/train.jsonl.gz``), or of one such file. A folder or file not named by split
    is all one split, read whole: a split name other than `default` for it is an error. A missing file, an
    empty folder, a split that matches no file or a dataset that cannot be loaded is an error here, before any
    row is read.
    """
    path = Path(data)
    spec = SplitSpec.parse(split if split is not None else default, "--split" if default == "train" else "--eval-split")
    window = (spec.start, spec.stop) if spec.sliced else None
    if path.is_dir():
        return RecordSource(split_files(path, spec.name or default, split is not None), window=window)
    if path.is_file():
        named = file_split(path, path.parent, ())
        if split is not None and spec.name and spec.name != (named or default):
            raise DpokitError(
                f"--split {split!r} does not name {path}: its name gives "
                + (f"split {named!r}" if named else "no split (the file is read whole)")
                + "; leave the name out (for example [:1000]) or pass the folder that holds the splits"
            )
        return RecordSource([path], window=window)
    if data_suffix(path) in FILE_SUFFIXES:
        raise DpokitError(f"data file {data} does not exist")
    name = split if split is not None else default
    return RecordSource([], hub_dataset(data, name, subset), f"{data}[{name}]")


def data_suffix(path: Path) -> str:
    """The file's format suffix, below a compression suffix: ``.jsonl`` for ``train.jsonl.gz``."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def is_data_file(path: Path) -> bool:
    """A file `file_records` reads: json/jsonl/csv/parquet, or json/jsonl/csv compressed (`COMPRESSIONS`)."""
    compressed = path.suffix.lower() in COMPRESSIONS
    suffix = data_suffix(path)
    return suffix in TEXT_SUFFIXES if compressed else suffix in FILE_SUFFIXES


def file_split(path: Path, folder: Path, asked: tuple[str, ...]) -> Optional[str]:
    """The split a file's name gives, or None: the hub's shard name (``train_prefs-00000-of-00001``), a name
    in `SPLIT_WORDS` or `asked` (``train.jsonl.gz``), or a folder between `folder` and the file named so
    (``data/train/part-0.parquet``)."""
    stem = path.name[
        : len(path.name) - sum(map(len, path.suffixes[-2 if path.suffix.lower() in COMPRESSIONS else -1 :]))
    ]
    shard = SHARD_NAME.match(stem)
    if shard:
        return shard["split"]
    if stem in SPLIT_WORDS or stem in asked:
        return stem
    parents = path.parent.relative_to(folder).parts
    return next((part for part in reversed(parents) if part in SPLIT_WORDS or part in asked), None)


def split_files(folder: Path, name: str, asked: bool) -> list[Path]:
    """The files of split `name` in `folder` (`file_split`), or every data file when no file is named by split
    (then only the default split, train, may be asked for). Files not named by split beside ones that are
    are left out, with a warning naming them."""
    files = data_files(folder)
    splits = {file: file_split(file, folder, (name,)) for file in files}
    found = sorted({split for split in splits.values() if split is not None})
    if not found:
        if asked and name != "train":
            raise DpokitError(
                f"--split {name!r}: no file in {folder} is named by split (as data/{name}-00000-of-00001.parquet "
                f"or {name}.jsonl are), so the folder is one split, read whole; leave --split out"
            )
        return files
    chosen = [file for file, split in splits.items() if split == name]
    if not chosen:
        raise DpokitError(
            f"no {name!r} split in {folder}: its files are named by the splits {', '.join(found)}; "
            "pass --split (and --eval-split) with one of them"
        )
    unnamed = [file for file, split in splits.items() if split is None]
    if unnamed:
        from dpokit import log

        log.warning(
            f"{folder}: {len(unnamed)} file(s) named by no split are not read for split {name!r} "
            f"(first: {unnamed[0].relative_to(folder)}); pass a file itself to read it"
        )
    return chosen


def load_prompts(path: str) -> list[list[dict[str, str]]]:
    """The prompts of a file, as message lists: a ``.txt`` file's non-empty lines (one user turn each), or the
    ``prompt`` of each row of a json/jsonl/csv/parquet file (text, or a list of messages as in the
    conversational format). A bad row stops with its location (nothing is skipped silently)."""
    file = Path(path)
    if not file.is_file():
        raise DpokitError(f"prompts file {path} does not exist")
    if file.suffix.lower() == ".txt":
        lines = file.read_text(encoding="utf-8").splitlines()
        return [[{"role": "user", "content": line}] for line in lines if line.strip()]
    prompts = []
    for record in file_records(file):
        value = record.row.get("prompt")
        try:
            if value is None:
                raise SkippedRow("missing", f"no 'prompt' column (columns: {', '.join(record.row)})")
            prompts.append(
                message_list(value, "prompt")
                if not isinstance(value, str)
                else [{"role": "user", "content": text_value(value, "prompt")}]
            )
        except SkippedRow as bad:
            raise DpokitError(
                f"{record.location}: {bad.detail}; a prompts file has a 'prompt' per row (text or messages)"
            ) from bad
    return prompts


def data_files(folder: Path) -> list[Path]:
    """The supported files below `folder` (`is_data_file`), in sorted order (hidden files left out)."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and is_data_file(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise DpokitError(
            f"folder {folder} has no {'/'.join(FILE_SUFFIXES)} files (nor .jsonl/.json/.csv compressed as "
            f"{'/'.join(COMPRESSIONS)})"
        )
    return files


def file_records(path: Path) -> Iterator[Record]:
    """The rows of one file, chosen by its suffix (below a ``.gz``/``.bz2``/``.xz`` one)."""
    suffix = data_suffix(path)
    if not is_data_file(path):
        raise DpokitError(
            f"{path}: unsupported file type {''.join(path.suffixes[-2:])!r}; use one of {', '.join(FILE_SUFFIXES)} "
            f"(.jsonl/.json/.csv may be compressed: {', '.join(COMPRESSIONS)})"
        )
    if suffix == ".jsonl":
        return jsonl_records(path)
    if suffix == ".json":
        return json_records(path)
    if suffix == ".csv":
        return csv_records(path)
    return parquet_records(path)


def open_text(path: Path, newline: Optional[str] = None):
    """A text file, or a compressed one (`COMPRESSIONS`) decompressed as it is read; UTF-8, a BOM skipped."""
    opener = COMPRESSIONS.get(path.suffix.lower(), open)
    return opener(path, "rt", encoding="utf-8-sig", newline=newline)


def open_binary(path: Path):
    opener = COMPRESSIONS.get(path.suffix.lower(), open)
    return opener(path, "rb")


@contextlib.contextmanager
def read_errors(path: Path) -> Iterator[None]:
    """Reading `path` inside: a file that is not UTF-8, or a compressed one that does not decompress, stops with an
    error naming it."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise not_utf8_error(path) from exc
    except (OSError, EOFError, lzma.LZMAError) as exc:
        if path.suffix.lower() not in COMPRESSIONS:
            raise
        raise not_decompressible_error(path, exc) from exc


def jsonl_records(path: Path) -> Iterator[Record]:
    """One JSON object per line; blank lines are allowed."""
    with read_errors(path), open_text(path) as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                row = parsed_json(line, path, number, "fix or remove that line")
                yield Record(f"{path} line {number}", object_row(row, f"{path} line {number}"))


def json_records(path: Path) -> Iterator[Record]:
    """A JSON array of objects; a ``.json`` file holding JSON lines is read as JSONL."""
    with read_errors(path), open_text(path) as stream:
        text = stream.read()
    if not text.lstrip().startswith("["):
        yield from jsonl_records(path)
        return
    for index, row in enumerate(json_array_items(text, path)):
        yield Record(f"{path} row {index}", object_row(row, f"{path} row {index}"))


def not_decompressible_error(path: Path, exc: BaseException) -> DpokitError:
    """The error for a compressed file that does not decompress (truncated, or not that compression)."""
    return DpokitError(
        f"{path}: not a readable {path.suffix} file ({exc}); download it again or decompress it yourself"
    )


def json_array_items(text: str, path: Path) -> Iterator[Any]:
    """The items of the JSON array `text`, decoded one at a time (the text is held, its rows are not).

    Anything that is not a well-formed array stops with the error `json.loads` gives for the whole text.
    """
    decoder = json.JSONDecoder()
    position = JSON_WHITESPACE.match(text).end()
    end = None  # just past the closing bracket, once it is found
    if text.startswith("[", position):
        position = JSON_WHITESPACE.match(text, position + 1).end()
        end = position + 1 if text.startswith("]", position) else None
        while end is None:
            try:
                item, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError:
                break
            yield item
            position = JSON_WHITESPACE.match(text, position).end()
            if text.startswith("]", position):
                end = position + 1
            elif text.startswith(",", position):
                position = JSON_WHITESPACE.match(text, position + 1).end()
            else:
                break
    if end is None or JSON_WHITESPACE.match(text, end).end() != len(text):
        parsed_json(text, path, 1, "fix the file")  # raises json's own message for the malformed spot


def parsed_json(text: str, path: Path, first_line: int, fix: str) -> Any:
    """`json.loads(text)`; invalid JSON raises a `DpokitError` naming file, line, column and `fix`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line = first_line + exc.lineno - 1
        raise DpokitError(f"{path} line {line}: not valid JSON ({exc.msg} at column {exc.colno}); {fix}") from exc


def csv_records(path: Path) -> Iterator[Record]:
    """Rows of a CSV file with a header line; every value is a string."""
    csv.field_size_limit(sys.maxsize)  # responses can be longer than csv's 128 KiB default
    with read_errors(path), open_text(path, newline="") as stream:
        reader = csv.DictReader(stream)
        for row in reader:
            location = f"{path} line {reader.line_num}"
            if None in row:
                raise DpokitError(
                    f"{location}: more values than the header has columns; quote values that contain commas"
                )
            yield Record(location, row)


def not_utf8_error(path: Path) -> DpokitError:
    """The error for a text file that is not UTF-8, naming its first bad line (found by a second, binary read)."""
    with open_binary(path) as lines:
        for number, line in enumerate(lines, start=1):  # noqa: B007 (read after the loop); a newline byte never occurs inside a UTF-8 character
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                byte = f"byte 0x{line[exc.start]:02x} at column {exc.start + 1}"
                break
        else:  # every line decodes on its own (cannot happen for a file that failed to decode)
            number, byte = 1, "an undecodable byte"
    return DpokitError(
        f"{path} line {number}: not UTF-8 text ({byte}); convert the file to UTF-8 "
        "(for example `iconv -f cp1252 -t utf-8 IN > OUT`, with the file's actual encoding)"
    )


def parquet_records(path: Path) -> Iterator[Record]:
    """The rows of a Parquet file, `PARQUET_BATCH_ROWS` decoded at a time."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        rows = (row for batch in batches for row in batch.to_pylist())
        for index, row in enumerate(rows):
            yield Record(f"{path} row {index}", row)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DpokitError(f"{path}: not a readable Parquet file ({exc})") from exc


def parquet_rows(path: Path) -> int:
    """A Parquet file's row count, from its metadata."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DpokitError(f"{path}: not a readable Parquet file ({exc})") from exc


def hub_dataset(name: str, split: str, subset: Optional[str]):
    """`datasets.load_dataset(name, subset, split=split)`: its rows stay in Arrow files until read."""
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # datasets raises many types (not found, offline, bad config)
        which = f"subset {subset!r}, split {split!r}" if subset else f"split {split!r}"
        raise DpokitError(
            f"could not load dataset {name!r} ({which}): {exc}; "
            "pass a local .json/.jsonl/.csv/.parquet file or folder, or check --subset and --split"
        ) from exc


def object_row(row: Any, location: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DpokitError(f"{location}: expected a JSON object with prompt/chosen/rejected, got {type(row).__name__}")
    return row


# ---------------------------------------------------------------------------------------------
# Column map


def parse_column_map(text: Optional[str], targets: tuple[str, ...] = COLUMNS) -> dict[str, str]:
    """``"chosen=better,rejected=worse"`` -> ``{"chosen": "better", "rejected": "worse"}``; `targets`: the names
    it may set (`ALL_COLUMN_MAP_TARGETS` before the data's shape is known, then `check_column_map`)."""
    mapping: dict[str, str] = {}
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        target, sep, source = (part.strip() for part in entry.partition("="))
        if not sep or not target or not source:
            raise DpokitError(f"--column-map entry {entry.strip()!r} is not target=source (for example chosen=better)")
        if target not in targets:
            raise DpokitError(f"--column-map target {target!r} is not one of {', '.join(targets)}")
        mapping[target] = source
    return mapping


def check_column_map(column_map: dict[str, str], shape: str) -> None:
    """Refuse --column-map targets of another shape (``scores`` for pairs, ``chosen`` for ranked or unpaired data)."""
    other = [target for target in column_map if target not in COLUMN_MAP_TARGETS[shape]]
    if other:
        raise DpokitError(
            f"--column-map target {other[0]!r} does not apply: the data is {shape} "
            f"(its targets: {', '.join(COLUMN_MAP_TARGETS[shape])}); see --format"
        )


def detect_shape(row: dict[str, Any], column_map: dict[str, str]) -> str:
    """``ranked`` for a row of k scored completions (``completions``, or Nectar's ``answers``, and no
    ``chosen``), ``unpaired`` for a row with a ``completion`` and a ``label`` (and no ``chosen``), else ``pairs``;
    a --column-map target of one shape decides for it."""
    shared = {"prompt", SYSTEM_COLUMN}  # targets of every shape
    if set(column_map) & (set(COLUMN_MAP_TARGETS["unpaired"]) - shared):
        return "unpaired"
    if set(column_map) & (set(COLUMN_MAP_TARGETS["ranked"]) - shared):
        return "ranked"
    if set(column_map) & (set(COLUMN_MAP_TARGETS["pairs"]) - shared) or "chosen" in row:
        return "pairs"
    if "completion" in row and "label" in row:
        return "unpaired"
    return "ranked" if "completions" in row or "answers" in row else "pairs"


def used_columns(shape: str, column_map: dict[str, str], scores: bool = False) -> set[str]:
    """The source columns a row of `shape` is read from (the mapped ones, their defaults, UltraFeedback's and
    Nectar's fallbacks, the system column, a pair's scores when the data has them): any other column is
    reported as not read, so no text is lost silently."""
    targets = COLUMN_MAP_TARGETS[shape]
    if shape == "pairs" and not scores:
        targets = tuple(target for target in targets if target not in PAIR_SCORE_COLUMNS)
    used = {column_map.get(target, target) for target in targets if target != "score"}
    return used | ({"instruction", "answers"} if shape == "ranked" else set())


def mapped_row(record: Record, column_map: dict[str, str]) -> dict[str, Any]:
    """The row's prompt/chosen/rejected values under their dpokit names (the prompt may be absent)."""
    row = record.row
    values = {}
    for column in COLUMNS:
        source = column_map.get(column, column)
        if source in row:
            values[column] = row[source]
        elif column_map.get(column) or column != "prompt":
            raise DpokitError(missing_column_message(record, column, column_map))
    return values


PROMPT_LIKE_COLUMNS = ("question", "instruction", "input", "query", "prompt_text", "context")  # a prompt elsewhere


def missing_column_message(record: Record, column: str, column_map: dict[str, str]) -> str:
    """A missing column's error: the columns found, and the --column-map (or --format ranked) fix."""
    found = ", ".join(map(str, record.row)) or "none"
    if column in column_map:
        return (
            f"{record.location}: column {column_map[column]!r} (mapped to {column} by --column-map) not found; "
            f"columns found: {found}"
        )
    if column in ("chosen", "rejected"):
        ranked = ranked_hint(record.row)
        if ranked:
            return f"{record.location}: no {column!r} column; columns found: {found}; {ranked}"
    guess = next((name for name in PROMPT_LIKE_COLUMNS if name in record.row), None) if column == "prompt" else None
    return (
        f"{record.location}: no {column!r} column; columns found: {found}; "
        f"name yours with --column-map {column}={guess or '<column>'}"
    )


def ranked_hint(row: dict[str, Any]) -> str:
    """The fix for a row that holds more than two completions in a list (ranked data read as pairs), or ''."""
    lists = [name for name, value in row.items() if isinstance(value, list) and len(value) > 2]
    if not lists:
        return ""
    scores = next((name for name in lists[1:] if all(isinstance(v, numbers.Real) for v in row[name])), "<column>")
    return (
        f"{lists[0]!r} holds {len(row[lists[0]])} items: for k completions per prompt, read it as ranked data with "
        f"--format ranked --column-map completions={lists[0]},scores={scores} (docs/data-formats.md, Ranked data)"
    )


# ---------------------------------------------------------------------------------------------
# Normalisation


def normalise(record: Record, format: str, column_map: dict[str, str], system_prompt: Optional[str]) -> Pair:
    """The record as a `Pair` of message lists; raises `SkippedRow` for a row that cannot be used.

    The row's own system text (`row_system_text`) becomes the prompt's system turn; its scores
    (`pair_scores`) are kept on the `Pair`."""
    values = mapped_row(record, column_map)
    row_format = detect_format(values) if format == "auto" else format
    if row_format == "implicit":
        if "prompt" not in values and not_turns_text(values["chosen"]):
            raise DpokitError(missing_column_message(record, "prompt", column_map))
        prompt, chosen, rejected = implicit_messages(values["chosen"], values["rejected"])
    elif row_format == "conversational":
        if "prompt" not in values:
            raise DpokitError(missing_column_message(record, "prompt", column_map))
        prompt = message_list(values["prompt"], "prompt")
        chosen = message_list(values["chosen"], "chosen")
        rejected = message_list(values["rejected"], "rejected")
    else:
        if "prompt" not in values:
            raise DpokitError(missing_column_message(record, "prompt", column_map))
        prompt = [{"role": "user", "content": text_value(values["prompt"], "prompt")}]
        chosen = [{"role": "assistant", "content": text_value(values["chosen"], "chosen")}]
        rejected = [{"role": "assistant", "content": text_value(values["rejected"], "rejected")}]
    if chosen == rejected:
        raise SkippedRow("identical_chosen_rejected", "chosen and rejected are the same")
    prompt = with_row_system(prompt, record, column_map, system_prompt)
    return Pair(record.location, row_format, prompt, chosen, rejected, pair_scores(record, column_map))


def not_turns_text(value: Any) -> bool:
    """Text that holds no Anthropic HH turn at all: a response, so the row lacks its prompt column."""
    return isinstance(value, str) and HH_TURN.search(value) is None


def row_system_text(record: Record, column_map: dict[str, str]) -> Optional[str]:
    """The row's own system prompt: the text of its ``system`` column (or the one --column-map names), None
    when it has none or an empty one. A value that is not text skips the row (``non_string_content``)."""
    source = column_map.get(SYSTEM_COLUMN, SYSTEM_COLUMN)
    if source not in record.row:
        if SYSTEM_COLUMN in column_map:
            raise DpokitError(missing_column_message(record, SYSTEM_COLUMN, column_map))
        return None
    value = record.row[source]
    if value is None or isinstance(value, str) and not value.strip():
        return None
    if not isinstance(value, str):
        raise SkippedRow("non_string_content", f"{source} is {type(value).__name__}, not a string")
    return value


def with_row_system(
    prompt: list[dict[str, str]], record: Record, column_map: dict[str, str], system_prompt: Optional[str]
) -> list[dict[str, str]]:
    """`prompt` with the row's system text as its system turn, else `system_prompt` (--system-prompt: the text
    for rows without their own). A row whose prompt already opens with another system turn is an error."""
    text = row_system_text(record, column_map)
    if text is None:
        return with_system_prompt(prompt, system_prompt) if system_prompt is not None else prompt
    if prompt and prompt[0]["role"] == "system" and prompt[0]["content"] != text:
        source = column_map.get(SYSTEM_COLUMN, SYSTEM_COLUMN)
        raise DpokitError(
            f"{record.location}: the prompt opens with a system turn and the {source!r} column holds another "
            "system text; keep one (rename the column, or map system= to another)"
        )
    return with_system_prompt(prompt, text)


def pair_scores(record: Record, column_map: dict[str, str]) -> Optional[tuple[float, float]]:
    """The pair's (chosen, rejected) scores from its ``score_chosen``/``score_rejected`` columns (or those
    --column-map names), float32 values, nan for a null or empty one; None when the row has neither column.
    One without the other, or a value that is not a number, is an error naming the row."""
    sources = [column_map.get(target, target) for target in PAIR_SCORE_COLUMNS]
    present = [source in record.row for source in sources]
    if not any(present) and not any(target in column_map for target in PAIR_SCORE_COLUMNS):
        return None
    if not all(present):
        missing = PAIR_SCORE_COLUMNS[present.index(False)]
        raise DpokitError(
            missing_column_message(record, missing, column_map) + " (scores come as a pair: both or neither)"
        )
    return tuple(pair_score(record.row[source], source, record) for source in sources)


def pair_score(value: Any, column: str, record: Record) -> float:
    """One pair score as float32 (nan when null or an empty CSV cell); text is read as a number (CSV cells)."""
    if value is None or isinstance(value, str) and not value.strip():
        return math.nan
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DpokitError(
            f"{record.location}: {column} is {value!r:.40} ({type(value).__name__}), not a number; a pair's scores "
            "are numbers (null for none)"
        )
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def detect_format(values: dict[str, Any]) -> str:
    """The row's shape: ``conversational`` for a message-list prompt, ``plain`` for strings, else ``implicit``.

    A text prompt next to whole conversations in chosen/rejected (as in UltraFeedback-binarized) is
    ``implicit``: the conversations already hold the prompt, and their shared turns are used.
    """
    if "prompt" not in values:
        return "implicit"
    if isinstance(values["prompt"], list):
        return "conversational"
    if isinstance(values["chosen"], list) and isinstance(values["rejected"], list):
        return "implicit"
    return "plain"


def text_value(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise SkippedRow("non_string_content", f"{column} is {type(value).__name__}, not a string")
    if not value.strip():
        raise SkippedRow("empty_content", f"{column} is empty")
    return value


def message_list(value: Any, column: str) -> list[dict[str, str]]:
    """A list of ``{role, content}`` messages, checked; other message keys are not kept."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise SkippedRow("non_string_content", f"{column} is {type(value).__name__}, not a list of messages")
    if not value:
        raise SkippedRow("empty_content", f"{column} has no messages")
    messages = []
    for index, message in enumerate(value):
        where = f"{column} message {index}"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            keys = ", ".join(message) if isinstance(message, dict) else type(message).__name__
            raise SkippedRow("malformed_message", f"{where} is not {{role, content}} (found {keys})")
        messages.append({"role": message["role"], "content": text_value(message["content"], where)})
    return messages


def implicit_messages(chosen: Any, rejected: Any) -> tuple[list, list, list]:
    """Split two whole conversations into (shared prompt, chosen completion, rejected completion).

    The prompt is the longest run of identical leading turns that ends right before an assistant
    turn in both conversations, so a completion always starts with the assistant's answer. What
    follows it must be one assistant turn on each side: conversations that diverge earlier (or go on
    after the answer) raise `SkippedRow` (``diverges_before_last_turn``), as training on them would
    train on user turns.
    """
    chosen = conversation(chosen, "chosen")
    rejected = conversation(rejected, "rejected")
    if chosen == rejected:
        raise SkippedRow("identical_chosen_rejected", "chosen and rejected are the same conversation")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    shared = min(shared, len(chosen) - 1, len(rejected) - 1)  # each side keeps at least one turn
    while shared > 0 and not (chosen[shared]["role"] == rejected[shared]["role"] == "assistant"):
        shared -= 1
    if shared == 0:
        raise SkippedRow("no_shared_prompt", "chosen and rejected share no turns before an assistant answer")
    chosen_part, rejected_part = chosen[shared:], rejected[shared:]
    if len(chosen_part) != 1 or len(rejected_part) != 1:  # both are assistant turns first (see above)
        raise SkippedRow(
            "diverges_before_last_turn",
            f"chosen and rejected differ from turn {shared} on ({len(chosen_part)} and {len(rejected_part)} "
            "turns): only a final assistant turn each can be a completion, so the row would train on other turns",
        )
    return chosen[:shared], chosen_part, rejected_part


def conversation(value: Any, column: str) -> list[dict[str, str]]:
    """A whole conversation from a message list or Anthropic HH text."""
    if isinstance(value, str):
        return hh_messages(value, column)
    return message_list(value, column)


def hh_messages(text: str, column: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> user and assistant messages."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise SkippedRow(
            "unparseable_conversation",
            f"{column} is text without a prompt column but not Human:/Assistant: turns",
        )
    messages = []
    for index, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2])):
        messages.append({"role": HH_ROLES[speaker], "content": text_value(content.strip(), f"{column} turn {index}")})
    return messages


def with_system_prompt(prompt: list[dict[str, str]], system_prompt: str) -> list[dict[str, str]]:
    """`prompt` with its system turn replaced by `system_prompt`, or one added in front."""
    system = {"role": "system", "content": system_prompt}
    if prompt and prompt[0]["role"] == "system":
        return [system] + prompt[1:]
    return [system] + prompt


# ---------------------------------------------------------------------------------------------
# Ranked rows

_MISSING = object()  # a completion object without the row's score key


def normalise_ranked(record: Record, column_map: dict[str, str], system_prompt: Optional[str]) -> Ranked:
    """The record as a `Ranked` row; raises `SkippedRow` for a row that states no preference.

    A completion whose score is missing (null, or no score key) or not finite, or whose content is
    unusable, is left out and listed in `Ranked.completions_dropped` (and in the `SkippedRow`'s, when the row
    is skipped too). A score that is not a number, or a ``scores`` list of another length than
    ``completions``, is a `DpokitError` naming the row and the key.
    """
    row = record.row
    prompt_column = ranked_column(record, "prompt", column_map, fallback="instruction")
    completions_column = ranked_column(record, "completions", column_map, fallback="answers")
    nectar = completions_column != column_map.get("completions", "completions")
    ultrafeedback = prompt_column != column_map.get("prompt", "prompt")
    items = list_value(row[completions_column], completions_column, record)
    raw_scores, score_key = completion_raw_scores(record, items, completions_column, column_map)

    completions, scores, names, dropped = [], [], [], []
    for index, (item, (value, where)) in enumerate(zip(items, raw_scores)):
        name = f"{completions_column}[{index}]"
        try:
            score = score_number(value, where, record)
            messages = completion_messages(item, name, record)
        except SkippedRow as skipped:
            dropped.append((skipped.reason, skipped.detail))
            continue
        completions.append(messages)
        scores.append(score)
        names.append(name)
    if score_key == "rank":
        scores = ranked_scores(scores)
    try:
        prompt = ranked_prompt(row[prompt_column], nectar)
    except SkippedRow as skipped:
        raise SkippedRow(skipped.reason, skipped.detail, dropped) from None
    problem = preference_problem(completions, scores, len(items))
    if problem is not None:
        raise SkippedRow(*problem, dropped)
    prompt = with_row_system(prompt, record, column_map, system_prompt)
    row_format = "nectar" if nectar else "ultrafeedback" if ultrafeedback else "ranked"
    return Ranked(record.location, row_format, prompt, completions, scores, names, dropped)


def ranked_column(record: Record, target: str, column_map: dict[str, str], fallback: str) -> str:
    """The column holding `target`: the mapped or same-named one, else `fallback` (UltraFeedback's
    ``instruction``, Nectar's ``answers``) when `target` is not mapped. A null value counts as absent when the
    other column has one (Parquet files and datasets give every row every column)."""
    source = column_map.get(target, target)
    if record.row.get(source) is not None or target in column_map and source in record.row:
        return source
    if target not in column_map and record.row.get(fallback) is not None:
        return fallback
    if source in record.row:
        return source
    raise DpokitError(missing_column_message(record, target, column_map))


def list_value(value: Any, column: str, record: Record) -> list:
    """A ranked row's list column; in a CSV cell, a JSON array."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if not isinstance(value, list):
        raise DpokitError(
            f"{record.location}: {column!r} is {type(value).__name__}, not a list; ranked data has a list of "
            "completions per row, and of scores unless the completions carry them (in a CSV cell: a JSON array)"
        )
    return value


def completion_raw_scores(
    record: Record, items: list, completions_column: str, column_map: dict[str, str]
) -> tuple[list[tuple[Any, str]], Optional[str]]:
    """Each completion's score as found, with the key it was read from (``scores[2]``), and the key the
    completion objects carry it under (None for a ``scores`` column)."""
    scores_column = column_map.get("scores", "scores")
    if "scores" in column_map or record.row.get(scores_column) is not None:
        if scores_column not in record.row:
            raise DpokitError(missing_column_message(record, "scores", column_map))
        scores = list_value(record.row[scores_column], scores_column, record)
        if len(scores) != len(items):
            raise DpokitError(
                f"{record.location}: {scores_column!r} has {len(scores)} values but {completions_column!r} has "
                f"{len(items)}; give one score per completion, in the same order"
            )
        return [(score, f"{scores_column}[{index}]") for index, score in enumerate(scores)], None
    key = column_map.get("score") or present_key(
        [item for item in items if isinstance(item, dict)], COMPLETION_SCORE_KEYS
    )
    if key is None and items:
        raise DpokitError(
            f"{record.location}: no {scores_column!r} column, and its completions carry no score "
            f"({', '.join(COMPLETION_SCORE_KEYS)}); add scores, or name the completions' score key with "
            "--column-map score=<key>"
        )
    return [
        (item.get(key, _MISSING) if isinstance(item, dict) else _MISSING, f"{completions_column}[{index}].{key}")
        for index, item in enumerate(items)
    ], key


def present_key(objects: list[dict], keys: tuple[str, ...]) -> Optional[str]:
    """The first of `keys` some object has a value for, else the first some object has at all."""
    for has in (lambda o, k: o.get(k) is not None, lambda o, k: k in o):
        found = next((key for key in keys if any(has(o, key) for o in objects)), None)
        if found is not None:
            return found
    return None


def score_number(value: Any, where: str, record: Record) -> float:
    """`value` as a float32 score; raises `SkippedRow` for a missing or non-finite one (that completion is left
    out) and `DpokitError` for one that is not a number."""
    if value is _MISSING:
        raise SkippedRow("missing_score", f"{where} is missing")
    if value is None:
        raise SkippedRow("missing_score", f"{where} is null")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DpokitError(
            f"{record.location}: {where} is {value!r:.40} ({type(value).__name__}), not a number; scores and ranks "
            "are numbers (null leaves that completion out)"
        )
    with np.errstate(over="ignore"):
        score = float(np.float32(value))
    if not math.isfinite(score):
        raise SkippedRow(
            "non_finite_score", f"{where} is {value!r}" + (" (beyond float32)" if math.isfinite(value) else "")
        )
    return score


def ranked_scores(ranks: list[float]) -> list[float]:
    """Ranks (1 best) as scores, higher better: ``max_rank - rank``, so the worst is 0 and equal ranks tie."""
    top = max(ranks, default=0.0)
    return [float(np.float32(top - rank)) for rank in ranks]


def completion_messages(item: Any, where: str, record: Record) -> list[dict[str, str]]:
    """One completion as assistant messages: text, a message list (or one message), or an object holding either
    under one of `COMPLETION_TEXT_KEYS`."""
    if isinstance(item, str):
        return [{"role": "assistant", "content": text_value(item, where)}]
    if isinstance(item, list) or isinstance(item, dict) and "role" in item:
        return message_list(item, where)
    if not isinstance(item, dict):
        raise SkippedRow("non_string_content", f"{where} is {type(item).__name__}, not text or messages")
    key = present_key([item], COMPLETION_TEXT_KEYS)
    if key is None:
        raise DpokitError(
            f"{record.location}: {where} has no text (keys: {', '.join(map(str, item)) or 'none'}); "
            f"a completion object holds it under one of {', '.join(COMPLETION_TEXT_KEYS)}"
        )
    value = item[key]
    if isinstance(value, dict):
        raise SkippedRow("non_string_content", f"{where}.{key} is dict, not text or messages")
    return completion_messages(value, f"{where}.{key}", record)


def ranked_prompt(value: Any, nectar: bool) -> list[dict[str, str]]:
    """The prompt's messages: text (one user turn; Nectar's: Anthropic HH turns) or a list of messages."""
    if nectar and isinstance(value, str):
        try:
            return hh_messages(HH_OPEN_REPLY.sub("", value), "prompt")
        except SkippedRow as skipped:
            if skipped.reason != "unparseable_conversation":
                raise
            raise SkippedRow(skipped.reason, "prompt is not Human:/Assistant: turns (as Nectar's are)") from None
    return prompt_messages(value)


def prompt_messages(value: Any) -> list[dict[str, str]]:
    """A ranked or unpaired row's prompt as messages: text (one user turn) or a list of messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": text_value(value, "prompt")}]
    return message_list(value, "prompt")


def preference_problem(
    completions: list, scores: list[float], total: Optional[int] = None
) -> Optional[tuple[str, str]]:
    """Why a ranked row states no preference, as (manifest reason, detail), or None when it does: it has fewer
    than 2 completions (of the row's `total`), they all tie, or those that score differently are the same
    (messages or ids)."""
    if len(completions) < 2:
        of = f" of {total}" if total is not None else ""
        return "fewer_than_2_completions", f"{len(completions)} usable completion{'s' * (len(completions) != 1)}{of}"
    if len(set(scores)) == 1:
        return "all_completions_tie", f"all {len(completions)} completions score {scores[0]:g}"
    if all(a == b for (a, x), (b, y) in itertools.combinations(zip(completions, scores), 2) if x != y):
        return "identical_completions", "the completions that score differently are the same"
    return None


# ---------------------------------------------------------------------------------------------
# Unpaired rows


def normalise_unpaired(record: Record, column_map: dict[str, str], system_prompt: Optional[str]) -> Unpaired:
    """The record as an `Unpaired` row (TRL's unpaired preference shape: ``prompt``, ``completion``, ``label``).

    The prompt is text (one user turn) or a list of messages; the completion text (one assistant turn), a list
    of messages or one message object. Its format is ``conversational`` for a message-list prompt, else
    ``plain``. A null label (or an empty CSV cell) raises `SkippedRow` (``missing_label``), as unusable content
    does; a label that is not true or false (`label_value`) and a missing column are a `DpokitError`.
    """
    values = {}
    for column in UNPAIRED_COLUMNS:
        source = column_map.get(column, column)
        if source not in record.row:
            raise DpokitError(missing_column_message(record, column, column_map))
        values[column] = record.row[source]
    label = label_value(values["label"], column_map.get("label", "label"), record)
    prompt = prompt_messages(values["prompt"])
    completion = completion_messages(values["completion"], "completion", record)
    prompt = with_row_system(prompt, record, column_map, system_prompt)
    row_format = "conversational" if isinstance(values["prompt"], list) else "plain"
    return Unpaired(record.location, row_format, prompt, completion, label)


def label_value(value: Any, column: str, record: Record) -> bool:
    """An unpaired row's label: True (desirable) or False (undesirable), from a bool, 1/0 or the text ``true``,
    ``false``, ``1`` or ``0`` (any case; CSV cells are text). Raises `SkippedRow` for a missing one (null, an
    empty cell, NaN: the row is left out and counted, as a missing score is) and `DpokitError` for any other
    value (as a score that is not a number is)."""
    if value is None or isinstance(value, str) and not value.strip():
        raise SkippedRow("missing_label", f"{column} is {'null' if value is None else 'empty'}")
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isnan(value):
        raise SkippedRow("missing_label", f"{column} is nan")
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_TEXTS:
        return LABEL_TEXTS[value.strip().lower()]
    raise DpokitError(
        f"{record.location}: {column} is {value!r:.40} ({type(value).__name__}), not a label; a label is true "
        '(desirable) or false (undesirable), or 1/0, or "true"/"false" (null leaves the row out)'
    )
