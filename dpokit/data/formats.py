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

import csv
import itertools
import json
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
RANKED_COLUMNS = ("prompt", "completions", "scores")
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
# --column-map targets of each shape; ``score`` names the score's key inside completion objects.
COLUMN_MAP_TARGETS = {"pairs": COLUMNS, "ranked": RANKED_COLUMNS + ("score",), "unpaired": UNPAIRED_COLUMNS}
ALL_COLUMN_MAP_TARGETS = tuple(dict.fromkeys(target for targets in COLUMN_MAP_TARGETS.values() for target in targets))
LABEL_TEXTS = {"true": True, "false": False, "1": True, "0": False}  # a label given as text (a CSV cell), lowercased
COMPLETION_TEXT_KEYS = ("text", "completion", "response", "content", "answer")  # a completion object's text
COMPLETION_SCORE_KEYS = ("score", "overall_score", "rank")  # its score (``rank``: 1 is best, see `ranked_scores`)
HH_OPEN_REPLY = re.compile(r"\n\nAssistant:\s*$")  # the reply to write, at the end of a Nectar prompt
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
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
    one at a time, so a pass to count them and one pass per split hold no more than a row."""

    files: list[Path]
    dataset: Any = None  # a `datasets.Dataset` (memory-mapped Arrow), for a dataset name
    label: str = ""  # a dataset's row locations start with it: ``name[split]``

    def __iter__(self) -> Iterator[Record]:
        if self.dataset is not None:
            return (Record(f"{self.label} row {index}", row) for index, row in enumerate(self.dataset))
        return (record for file in self.files for record in file_records(file))

    def count(self) -> int:
        """How many rows there are: a dataset's length, a Parquet file's metadata, else a pass that parses
        every row (so malformed JSON or CSV stops the run before any tokenizing)."""
        if self.dataset is not None:
            return len(self.dataset)
        return sum(
            parquet_rows(file) if file.suffix.lower() == ".parquet" else sum(1 for _ in file_records(file))
            for file in self.files
        )


def open_records(data: str, split: str = "train", subset: Optional[str] = None) -> RecordSource:
    """The rows of a local file, a folder of files, or a dataset name for `datasets.load_dataset`.

    A missing file, an empty folder or a dataset that cannot be loaded is an error here, before any row is read.
    """
    path = Path(data)
    if path.is_dir():
        return RecordSource(data_files(path))
    if path.is_file():
        return RecordSource([path])
    if path.suffix.lower() in FILE_SUFFIXES:
        raise DpokitError(f"data file {data} does not exist")
    return RecordSource([], hub_dataset(data, split, subset), f"{data}[{split}]")


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
    """The supported files below `folder`, in sorted order (hidden files left out)."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in FILE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise DpokitError(f"folder {folder} has no {'/'.join(FILE_SUFFIXES)} files")
    return files


def file_records(path: Path) -> Iterator[Record]:
    """The rows of one file, chosen by its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return jsonl_records(path)
    if suffix == ".json":
        return json_records(path)
    if suffix == ".csv":
        return csv_records(path)
    if suffix == ".parquet":
        return parquet_records(path)
    raise DpokitError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def jsonl_records(path: Path) -> Iterator[Record]:
    """One JSON object per line; blank lines are allowed."""
    with open(path, encoding="utf-8-sig") as lines:
        try:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    row = parsed_json(line, path, number, "fix or remove that line")
                    yield Record(f"{path} line {number}", object_row(row, f"{path} line {number}"))
        except UnicodeDecodeError as exc:
            raise not_utf8_error(path) from exc


def json_records(path: Path) -> Iterator[Record]:
    """A JSON array of objects; a ``.json`` file holding JSON lines is read as JSONL."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise not_utf8_error(path) from exc
    if not text.lstrip().startswith("["):
        yield from jsonl_records(path)
        return
    for index, row in enumerate(json_array_items(text, path)):
        yield Record(f"{path} row {index}", object_row(row, f"{path} row {index}"))


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
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        try:
            for row in reader:
                location = f"{path} line {reader.line_num}"
                if None in row:
                    raise DpokitError(
                        f"{location}: more values than the header has columns; quote values that contain commas"
                    )
                yield Record(location, row)
        except UnicodeDecodeError as exc:
            raise not_utf8_error(path) from exc


def not_utf8_error(path: Path) -> DpokitError:
    """The error for a text file that is not UTF-8, naming its first bad line (found by a second, binary read)."""
    with open(path, "rb") as lines:
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
    if set(column_map) & (set(COLUMN_MAP_TARGETS["unpaired"]) - {"prompt"}):
        return "unpaired"
    if set(column_map) & (set(COLUMN_MAP_TARGETS["ranked"]) - {"prompt"}):
        return "ranked"
    if set(column_map) & {"chosen", "rejected"} or "chosen" in row:
        return "pairs"
    if "completion" in row and "label" in row:
        return "unpaired"
    return "ranked" if "completions" in row or "answers" in row else "pairs"


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


def missing_column_message(record: Record, column: str, column_map: dict[str, str]) -> str:
    found = ", ".join(map(str, record.row)) or "none"
    if column in column_map:
        return (
            f"{record.location}: column {column_map[column]!r} (mapped to {column} by --column-map) not found; "
            f"columns found: {found}"
        )
    return (
        f"{record.location}: no {column!r} column; columns found: {found}; "
        f"name yours with --column-map {column}=<column>"
    )


# ---------------------------------------------------------------------------------------------
# Normalisation


def normalise(record: Record, format: str, column_map: dict[str, str], system_prompt: Optional[str]) -> Pair:
    """The record as a `Pair` of message lists; raises `SkippedRow` for a row that cannot be used."""
    values = mapped_row(record, column_map)
    row_format = detect_format(values) if format == "auto" else format
    if row_format == "implicit":
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
    if system_prompt is not None:
        prompt = with_system_prompt(prompt, system_prompt)
    return Pair(record.location, row_format, prompt, chosen, rejected)


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
    turn in both conversations, so a completion always starts with the assistant's answer.
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
    return chosen[:shared], chosen[shared:], rejected[shared:]


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
    if system_prompt is not None:
        prompt = with_system_prompt(prompt, system_prompt)
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
    if system_prompt is not None:
        prompt = with_system_prompt(prompt, system_prompt)
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
