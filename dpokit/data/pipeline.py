"""`dpokit prepare`: read pairs (or ranked or unpaired rows), normalise them to messages, tokenize, and write
``prepared/``.

The data's shape, pairs, ranked (k scored completions per prompt) or unpaired (KTO's one completion with a
thumbs-up/down label), is `--format ranked|unpaired` or detected from the first train row's columns
(`formats.detect_shape`). The steps, for each split (``train``, and ``eval`` from ``--eval-fraction`` or
``--eval-data``), a chunk of rows at a time, so memory does not grow with the number of rows:

1. read the source's rows lazily (`formats.open_records`), after one pass that counts them (the
   progress bar's total, the eval rows to hold out, malformed input found before any work);
2. normalise each row to a `Pair` (or `Ranked`, or `Unpaired`) of messages (`formats.normalise`,
   `formats.normalise_ranked`, `formats.normalise_unpaired`), skipping unusable rows (and a ranked row's
   unusable completions);
3. tokenize rows in chunks, on ``num_proc`` processes (`tokenize.PairTokenizer`), applying the
   length limits (`tokenize.LengthLimits`), with a few chunks in flight;
4. unpaired rows only: give each kept row its KL completion, the next kept row's completion
   (`with_kl_completions`);
5. append the kept rows to the split's Arrow files (`prepared.SplitWriter`), inside the temporary
   directory that `prepared.write_prepared_with` renames into place once ``manifest.json`` is written.

What the manifest needs of the kept rows is kept as it goes: counts, and the token lengths
(4 bytes a length) for the percentiles. Every skipped row (and every completion left out of a ranked
row) is counted by reason in the manifest and in the closing summary table.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import random
import tempfile
import time
from array import array
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from dpokit import __version__, log
from dpokit.artifacts import check_replaceable
from dpokit.data.formats import (
    ALL_COLUMN_MAP_TARGETS,
    FORMATS,
    Pair,
    Ranked,
    Record,
    SkippedRow,
    Unpaired,
    check_column_map,
    detect_shape,
    normalise,
    normalise_ranked,
    normalise_unpaired,
    open_records,
    parse_column_map,
    used_columns,
)
from dpokit.data.prepared import SplitWriter, write_prepared_with
from dpokit.data.tokenize import (
    PLAIN_TURN_SEPARATOR,
    LengthLimits,
    PairTokenizer,
    TokenizedPair,
    TokenizedRanked,
    TokenizedUnpaired,
    load_tokenizer,
)
from dpokit.errors import DpokitError
from dpokit.fingerprint import tokenizer_fingerprint
from dpokit.metrics import column_table

CHUNK_SIZE = 256  # pairs per tokenizer call and per worker task
CHUNKS_AHEAD_PER_PROCESS = 2  # chunks queued per tokenizer process: each has the next while it works
PERCENTILES = (50, 90, 99)


@dataclass
class PrepareOptions:
    """The settings of one `dpokit prepare` run (the CLI's options, one field each)."""

    data: str
    model: str
    out: Path
    tokenizer: Optional[str] = None
    format: str = "auto"
    column_map: Optional[str] = None
    system_prompt: Optional[str] = None
    chat_template: Optional[str] = None
    split: Optional[str] = None  # None: train (a folder not named by split: all of it)
    eval_split: Optional[str] = None  # None: test, for --eval-data; given alone: the eval split of `data`
    subset: Optional[str] = None
    max_length: int = 1024
    max_prompt_length: Optional[int] = None
    max_completion_length: Optional[int] = None
    truncation: str = "keep_start"
    overlength: str = "truncate"
    separator: str = PLAIN_TURN_SEPARATOR
    eval_fraction: float = 0.0
    eval_data: Optional[str] = None
    seed: int = 42
    num_proc: int = 1
    overwrite: bool = False

    def length_limits(self) -> LengthLimits:
        """The length settings, checked against each other."""
        return LengthLimits(
            self.max_length, self.max_prompt_length, self.max_completion_length, self.truncation, self.overlength
        )


# What happened to kept rows, counted in the manifest and the summary (`TokenizedPair` flags).
ROW_EVENTS = ("truncated", "truncated_prompt", "truncated_completion", "retokenized", "template_common_prefix")


@dataclass
class SplitResult:
    """The counts of what happened to one split's rows, and the token lengths of the kept ones."""

    source: str
    shape: str = "pairs"
    read: int = 0
    kept: int = 0
    events: Counter = field(default_factory=Counter)  # ROW_EVENTS -> kept rows
    dropped: Counter = field(default_factory=Counter)
    first_dropped: dict[str, str] = field(default_factory=dict)  # reason -> "location: detail"
    formats: Counter = field(default_factory=Counter)
    prompt_lengths: array = field(default_factory=lambda: array("i"))  # a kept row's prompt tokens
    completion_lengths: array = field(default_factory=lambda: array("i"))  # its chosen and rejected (k; 1) tokens
    group_sizes: Counter = field(default_factory=Counter)  # ranked: k -> kept rows with k completions
    completions_dropped: Counter = field(default_factory=Counter)  # ranked: reason -> completions left out
    first_completion_dropped: dict[str, str] = field(default_factory=dict)  # reason -> "location: detail"
    labels: Counter = field(default_factory=Counter)  # unpaired: desirable/undesirable -> kept rows
    kl_completions_truncated: int = 0  # unpaired: KL completions cut to fit behind their row's prompt
    unused_columns: Counter = field(default_factory=Counter)  # source column no mapping reads -> rows having it
    scored: int = 0  # pairs with scores: kept rows whose two scores are both numbers

    def drop(self, reason: str, location: str, detail: str) -> None:
        self.dropped[reason] += 1
        self.first_dropped.setdefault(reason, f"{location}: {detail}")

    def drop_completions(self, dropped: Iterable[tuple[str, str]], location: str) -> None:
        """Count a ranked row's completions left out, (reason, detail) each, whether or not the row is kept."""
        for reason, detail in dropped:
            self.completions_dropped[reason] += 1
            self.first_completion_dropped.setdefault(reason, f"{location}: {detail}")

    def keep(self, ids: TokenizedPair | TokenizedRanked | TokenizedUnpaired) -> None:
        self.kept += 1
        self.prompt_lengths.append(len(ids.prompt_ids))
        if isinstance(ids, TokenizedRanked):
            self.completion_lengths.extend(map(len, ids.completion_ids))
            self.group_sizes[len(ids.completion_ids)] += 1
        elif isinstance(ids, TokenizedUnpaired):  # its own completion: the KL completion is another row's
            self.completion_lengths.append(len(ids.completion_ids))
            self.labels[label_name(ids.label)] += 1
        else:
            self.completion_lengths.extend((len(ids.chosen_ids), len(ids.rejected_ids)))
            if ids.scores is not None and not any(map(math.isnan, ids.scores)):
                self.scored += 1
        self.events.update(event for event in ROW_EVENTS if getattr(ids, event))


@dataclass
class SplitSource:
    """Where one split's rows come from: the manifest's label, the rows (read afresh on each call), how many."""

    label: str
    records: Callable[[], Iterable[Record]]
    rows: int


def run_prepare(options: PrepareOptions, console: Optional[Console] = None) -> Path:
    """Prepare `options.data` into `options.out`; returns the output directory."""
    console = console or log.console()
    started = time.perf_counter()
    check_options(options)
    column_map = parse_column_map(options.column_map, ALL_COLUMN_MAP_TARGETS)
    tokenizer = load_tokenizer(options.tokenizer or options.model, options.chat_template)
    pair_tokenizer = PairTokenizer(tokenizer, options.length_limits(), options.separator)
    sources = split_sources(options)
    shape = data_shape(options.format, sources["train"], column_map)
    check_column_map(column_map, shape)
    scores = shape == "pairs" and data_has_scores(sources["train"], column_map)

    results: dict[str, SplitResult] = {}

    def write_splits(tmp: Path) -> dict:
        """Stream each split's kept rows into ``tmp/{split}``; the manifest (`write_prepared_with` finishes it)."""
        with worker_pool(pair_tokenizer, options.num_proc) as pool, rows_progress(console) as progress:
            for name, source in sources.items():
                results[name] = prepare_split(
                    name, source, options, column_map, pair_tokenizer, pool, progress, tmp / name, shape, scores
                )
        return build_manifest(options, results, tokenizer, column_map, shape, scores)

    out = write_prepared_with(options.out, write_splits, overwrite=options.overwrite)
    console.print(summary_table(results, out, time.perf_counter() - started))
    return out


# ---------------------------------------------------------------------------------------------
# Checks and sources


def check_options(options: PrepareOptions) -> None:
    """Refuse bad option values and an output directory that must not be replaced, before any work."""
    if options.format not in FORMATS:
        raise DpokitError(f"--format {options.format!r} is not one of {', '.join(FORMATS)}")
    if not 0.0 <= options.eval_fraction < 1.0:
        raise DpokitError(f"--eval-fraction {options.eval_fraction} must be at least 0 and below 1")
    if options.eval_fraction and options.eval_data:
        raise DpokitError("pass --eval-fraction or --eval-data, not both")
    if options.eval_fraction and options.eval_split is not None:
        raise DpokitError(
            "pass --eval-fraction (a random share of the train rows) or --eval-split (a split of the data), not both"
        )
    if options.num_proc < 1:
        raise DpokitError(f"--num-proc {options.num_proc} must be at least 1")
    options.length_limits()
    inputs = (options.data, options.eval_data, options.model, options.tokenizer, options.chat_template)
    check_output_dir(Path(options.out), options.overwrite, inputs)
    check_output_writable(Path(options.out))


def check_output_dir(out: Path, overwrite: bool, inputs: tuple[Optional[str], ...] = ()) -> None:
    """`out` may be written: absent or empty, or (with overwrite) an earlier prepare output holding none of `inputs`."""
    check_replaceable(out, "prepared", overwrite, inputs=inputs)


def check_output_writable(out: Path) -> None:
    """`out` can be created: its nearest existing ancestor is a directory this process may write in.

    Probed by making (and removing) a hidden directory there: permission bits do not tell (root, a
    read-only mount, ACLs), and finding out after tokenizing wastes the whole run.
    """
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DpokitError(f"cannot write --out {out}: {parent} is a file, not a directory; choose another --out")
    try:
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)).rmdir()
    except OSError as exc:
        raise DpokitError(
            f"cannot write --out {out}: {parent} is not writable ({exc.strerror}); "
            "choose a writable --out or fix the directory's permissions"
        ) from exc


def split_sources(options: PrepareOptions) -> dict[str, SplitSource]:
    """Each split's source: train, and eval when one is asked for. Counts the rows (one reading pass)."""
    records = open_records(options.data, options.split, options.subset)
    label = options.data if options.split is None else f"{options.data} [{options.split}]"
    if options.eval_data or options.eval_split is not None:
        eval_source = options.eval_data or options.data
        eval_records = open_records(eval_source, options.eval_split, options.subset, default="test")
        eval_label = eval_source if options.eval_split is None else f"{eval_source} [{options.eval_split}]"
        return {
            "train": SplitSource(label, lambda: records, records.count()),
            "eval": SplitSource(eval_label, lambda: eval_records, eval_records.count()),
        }
    if not options.eval_fraction:
        return {"train": SplitSource(label, lambda: records, records.count())}
    count = records.count()
    held_out = held_out_rows(count, options.eval_fraction, options.seed)
    label = f"{options.data} (eval fraction {options.eval_fraction}, seed {options.seed})"

    def rows(eval_: bool) -> Iterator[Record]:
        return (record for record, held in zip(records, held_out) if held == eval_)

    eval_rows = int(held_out.sum())
    return {
        "train": SplitSource(label, lambda: rows(False), count - eval_rows),
        "eval": SplitSource(label, lambda: rows(True), eval_rows),
    }


def data_shape(format: str, train: SplitSource, column_map: dict[str, str]) -> str:
    """``ranked`` or ``unpaired`` for --format ranked or unpaired, ``pairs`` for another format, else what the
    first train row's columns say (`formats.detect_shape`; the rows of every split must then have that shape)."""
    if format != "auto":
        return format if format in ("ranked", "unpaired") else "pairs"
    first = next(iter(train.records()), None)
    return detect_shape(first.row, column_map) if first is not None else "pairs"


def data_has_scores(train: SplitSource, column_map: dict[str, str]) -> bool:
    """Whether pairs carry scores: --column-map names a score column, or the first train row has a
    ``score_chosen`` column (`formats.pair_scores` reads them, and refuses one without the other)."""
    if {"score_chosen", "score_rejected"} & set(column_map):
        return True
    first = next(iter(train.records()), None)
    return first is not None and any(name in first.row for name in ("score_chosen", "score_rejected"))


def held_out_rows(count: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded random `fraction` of the rows ``0..count-1`` (the eval rows), as a ``[count]`` bool mask.

    The rows are the first ``round(count * fraction)`` of ``range(count)`` shuffled by
    ``random.Random(seed).shuffle``: shuffling a numpy array swaps the same positions as shuffling a
    list, in 8 bytes a row instead of a list's 36.
    """
    size = round(count * fraction)
    if size == 0 or size == count:
        raise DpokitError(
            f"--eval-fraction {fraction} of {count} rows leaves {'no eval' if size == 0 else 'no train'} rows; "
            "change the fraction or use --eval-data"
        )
    order = np.arange(count)
    random.Random(seed).shuffle(order)
    held_out = np.zeros(count, dtype=bool)
    held_out[order[:size]] = True
    return held_out


# ---------------------------------------------------------------------------------------------
# One split


def prepare_split(
    name: str,
    source: SplitSource,
    options: PrepareOptions,
    column_map: dict[str, str],
    pair_tokenizer: PairTokenizer,
    pool,
    progress: Progress,
    directory: Path,
    shape: str = "pairs",
    scores: bool = False,
) -> SplitResult:
    """Normalise, tokenize and write one split's rows (of `shape`; pairs with their `scores`) to `directory`, in
    source order, a chunk at a time."""
    result = SplitResult(source=source.label, shape=shape)
    task = progress.add_task(name, total=source.rows)
    rows = normalised_rows(source.records(), options, column_map, result, lambda: progress.advance(task), shape, scores)
    ahead = CHUNKS_AHEAD_PER_PROCESS * options.num_proc
    chunks = tokenized_chunks(chunked(rows, CHUNK_SIZE), pair_tokenizer, pool, ahead)
    kept = kept_rows(chunks, options.overlength, result, lambda count: progress.advance(task, count))
    if shape == "unpaired":
        stored = with_kl_completions(kept, name, options, result)
    else:
        stored = (stored_columns(ids, scores) for ids in kept)
    with SplitWriter(directory, shape, scores) as writer:
        for columns in stored:
            writer.add(*columns)
        if result.kept == 0:
            raise DpokitError(no_rows_kept_message(name, result))
        writer.finish()
    return result


def kept_rows(
    chunks: Iterable[tuple[list, list]], overlength: str, result: SplitResult, advance: Callable[[int], None]
) -> Iterator[TokenizedPair | TokenizedRanked | TokenizedUnpaired]:
    """The ids of each row that tokenizing keeps, in source order, each counted in `result`; the dropped rows
    (and a ranked row's completions left out) are counted instead. `advance(n)` follows each chunk of n rows.
    Under ``--overlength error`` an over-long row stops the run, naming it."""
    for chunk, chunk_ids in chunks:
        for row, ids in zip(chunk, chunk_ids):
            if ids.dropped == "overlength" and overlength == "error":
                raise DpokitError(
                    f"{row.location}: {ids.detail}; raise --max-length, or pass --overlength truncate or drop"
                )
            if isinstance(ids, TokenizedRanked):
                result.drop_completions(ids.completions_dropped, row.location)
            if ids.dropped is not None:
                result.drop(ids.dropped, row.location, ids.detail)
                continue
            if isinstance(row, Pair):
                ids.scores = row.scores
            result.keep(ids)
            yield ids
        advance(len(chunk))


def stored_columns(ids: TokenizedPair | TokenizedRanked, scores: bool = False) -> tuple:
    """A kept pair's or ranked row's values, in `SplitWriter` column order (a pair's two scores last, with
    `scores`: nan for a row without them)."""
    if isinstance(ids, TokenizedRanked):
        return ids.prompt_ids, ids.completion_ids, ids.scores
    if scores:
        return ids.prompt_ids, ids.chosen_ids, ids.rejected_ids, *(ids.scores or (math.nan, math.nan))
    return ids.prompt_ids, ids.chosen_ids, ids.rejected_ids


def with_kl_completions(
    rows: Iterable[TokenizedUnpaired], split: str, options: PrepareOptions, result: SplitResult
) -> Iterator[tuple[list[int], list[list[int]], list[float]]]:
    """Each kept unpaired row's values (`unpaired_columns`) with its KL completion: the completion of the next
    kept row, and the last row's the first row's (a cyclic shift by one within the split, in written order).

    KTO estimates its KL term from completions behind prompts they do not answer (TRL shifts them within a
    batch); fixing them here puts their reference log-probs in the cache, and makes them the same whatever the
    batch size. Streams: holds the first row's completion and the row that waits for the next one's. A split
    that keeps one row has no other completion to give it: an error naming the split and the fix.
    """
    first_completion: Optional[list[int]] = None
    waiting: Optional[TokenizedUnpaired] = None
    count = 0
    for row in rows:
        count += 1
        if waiting is None:
            first_completion = row.completion_ids
        else:
            yield unpaired_columns(waiting, row.completion_ids, options.max_length, result)
        waiting = row
    if count == 1:
        raise DpokitError(one_row_split_message(split, options, result))
    if waiting is not None:  # no rows at all is `prepare_split`'s error
        yield unpaired_columns(waiting, first_completion, options.max_length, result)


def unpaired_columns(
    row: TokenizedUnpaired, kl_completion: list[int], max_length: int, result: SplitResult
) -> tuple[list[int], list[list[int]], list[float]]:
    """The row's stored values: its prompt, ``[completion, kl_completion]`` and ``[label, nan]`` (1.0 desirable,
    0.0 undesirable; the KL completion has no label).

    The KL completion follows this row's prompt, not its own, so it keeps only its first tokens that fit in
    `max_length` behind it (it is an estimate, never trained on; counted in `result.kl_completions_truncated`).
    At least one always fits: a kept row's prompt leaves room for its own completion, which is never empty.
    """
    room = max_length - len(row.prompt_ids)
    if len(kl_completion) > room:
        kl_completion = kl_completion[:room]
        result.kl_completions_truncated += 1
    return row.prompt_ids, [row.completion_ids, kl_completion], [float(row.label), math.nan]


def label_name(label: bool) -> str:
    """The manifest's name of an unpaired label: ``desirable`` (True) or ``undesirable``."""
    return "desirable" if label else "undesirable"


def one_row_split_message(split: str, options: PrepareOptions, result: SplitResult) -> str:
    """Why an unpaired split of one kept row cannot be written, and what to change."""
    if split == "eval":
        fix = "raise --eval-fraction" if options.eval_fraction else "add rows to --eval-data"
        fix += ", or prepare without an eval split"
    else:
        fix = "add rows to the data"
    dropped = ", ".join(f"{reason} {count}" for reason, count in result.dropped.most_common())
    read = f"{result.read} read" + (f"; dropped: {dropped}" if dropped else "")
    return (
        f"the {split} split keeps only 1 unpaired row from {result.source} ({read}): KTO's KL estimate gives each "
        f"row the completion of another, so an unpaired split needs at least 2 rows; {fix}"
    )


def normalised_rows(
    records: Iterable[Record],
    options: PrepareOptions,
    column_map: dict[str, str],
    result: SplitResult,
    on_skip: Callable[[], None],
    shape: str = "pairs",
    scores: bool = False,
) -> Iterator[Pair | Ranked | Unpaired]:
    """Each usable record as a `Pair` (or, for the ``ranked`` and ``unpaired`` shapes, a `Ranked` or `Unpaired`
    row); the others are counted in `result` (and `on_skip` called) instead, as are a ranked row's completions
    left out, and every source column no mapping reads (``unused_columns``: its text goes nowhere)."""
    used = used_columns(shape, column_map, scores)
    for record in records:
        result.read += 1
        result.unused_columns.update(column for column in record.row if column not in used)
        try:
            if shape == "ranked":
                row = normalise_ranked(record, column_map, options.system_prompt)
            elif shape == "unpaired":
                row = normalise_unpaired(record, column_map, options.system_prompt)
            else:
                row = normalise(record, options.format, column_map, options.system_prompt)
        except SkippedRow as skipped:
            result.drop_completions(skipped.completions_dropped, record.location)
            result.drop(skipped.reason, record.location, skipped.detail)
            on_skip()
            continue
        if isinstance(row, Ranked):
            result.drop_completions(row.completions_dropped, record.location)
        result.formats[row.format] += 1
        yield row


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """`items` in lists of `size` (the last one shorter)."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def tokenized_chunks(
    chunks: Iterable[list[Pair | Ranked | Unpaired]], pair_tokenizer: PairTokenizer, pool, ahead: int
) -> Iterator[tuple[list[Pair | Ranked | Unpaired], list[TokenizedPair | TokenizedRanked | TokenizedUnpaired]]]:
    """Each chunk with its ids, in order. With a pool, at most `ahead` chunks are submitted and not yet
    taken back: `Pool.imap` would read the whole source into its task queue, holding every row."""
    if pool is None:
        for chunk in chunks:
            yield chunk, tokenized(pair_tokenizer, chunk)
        return
    in_flight: deque = deque()
    for chunk in chunks:
        in_flight.append((chunk, pool.apply_async(tokenize_chunk, (chunk,))))
        if len(in_flight) >= ahead:
            chunk, ids = in_flight.popleft()
            yield chunk, ids.get()
    while in_flight:
        chunk, ids = in_flight.popleft()
        yield chunk, ids.get()


def no_rows_kept_message(name: str, result: SplitResult) -> str:
    if not result.read:
        return f"no {name} rows in {result.source}: it is empty"
    reasons = ", ".join(f"{reason} {count}" for reason, count in result.dropped.most_common())
    first = next(iter(result.first_dropped.values()))
    return f"no {name} rows kept from {result.source} ({result.read} read; dropped: {reasons}); first: {first}"


# ---------------------------------------------------------------------------------------------
# Worker processes


_worker_tokenizer: Optional[PairTokenizer] = None


def init_worker(pair_tokenizer: PairTokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = pair_tokenizer


def tokenize_chunk(rows: list[Pair | Ranked | Unpaired]) -> list[TokenizedPair | TokenizedRanked | TokenizedUnpaired]:
    """Tokenize a chunk in a worker process (with the `PairTokenizer` its initializer stored)."""
    return tokenized(_worker_tokenizer, rows)


def tokenized(
    pair_tokenizer: PairTokenizer, rows: list[Pair | Ranked | Unpaired]
) -> list[TokenizedPair | TokenizedRanked | TokenizedUnpaired]:
    """The ids of a chunk of pairs, of ranked rows or of unpaired rows (a chunk holds one kind)."""
    if rows and isinstance(rows[0], Ranked):
        return pair_tokenizer.tokenize_ranked(rows)
    if rows and isinstance(rows[0], Unpaired):
        return pair_tokenizer.tokenize_unpaired(rows)
    return pair_tokenizer.tokenize(rows)


@contextmanager
def worker_pool(pair_tokenizer: PairTokenizer, num_proc: int) -> Iterator[Optional[multiprocessing.pool.Pool]]:
    """A pool of `num_proc` tokenizer processes, or None to tokenize in this process."""
    if num_proc == 1:
        yield None
        return
    with multiprocessing.Pool(num_proc, initializer=init_worker, initargs=(pair_tokenizer,)) as pool:
        yield pool


# ---------------------------------------------------------------------------------------------
# Output


def build_manifest(
    options: PrepareOptions,
    results: dict[str, SplitResult],
    tokenizer,
    column_map: Optional[dict[str, str]] = None,
    shape: str = "pairs",
    scores: bool = False,
) -> dict:
    """Everything `write_prepared_with` records besides the format version, data fingerprint and file digests
    (``scores``: kept pairs with both scores, when the data has them)."""
    totals = SplitResult(source=options.data, shape=shape)
    for result in results.values():
        totals.read += result.read
        totals.kept += result.kept
        totals.prompt_lengths += result.prompt_lengths
        totals.completion_lengths += result.completion_lengths
        totals.events.update(result.events)
        totals.dropped.update(result.dropped)
        for reason, example in result.first_dropped.items():
            totals.first_dropped.setdefault(reason, example)
        totals.formats.update(result.formats)
        totals.group_sizes.update(result.group_sizes)
        totals.labels.update(result.labels)
        totals.kl_completions_truncated += result.kl_completions_truncated
        totals.unused_columns.update(result.unused_columns)
        totals.scored += result.scored
        totals.completions_dropped.update(result.completions_dropped)
        for reason, example in result.first_completion_dropped.items():
            totals.first_completion_dropped.setdefault(reason, example)
    return {
        "shape": shape,
        "source": options.data,
        "splits": {name: split_manifest(result, scores) for name, result in results.items()},
        "counts": counts(totals),
        "lengths": lengths(totals),
        **shape_stats(totals),
        **({"scores": {"present": totals.scored}} if scores else {}),
        "tokenizer": {"name": options.tokenizer or options.model, "fingerprint": tokenizer_fingerprint(tokenizer)},
        "chat_template": tokenizer.chat_template or None,
        "max_length": options.max_length,
        "max_prompt_length": options.max_prompt_length,
        "max_completion_length": options.max_completion_length,
        "truncation": options.truncation,
        "overlength": options.overlength,
        "separator": None if tokenizer.chat_template else options.separator,
        "format": options.format,
        "column_map": column_map if column_map is not None else parse_column_map(options.column_map),
        "system_prompt": options.system_prompt,
        "eval_fraction": options.eval_fraction,
        "seed": options.seed,
        "dpokit_version": __version__,
    }


def split_manifest(result: SplitResult, scores: bool = False) -> dict:
    return {
        "rows": result.kept,
        "source": result.source,
        **counts(result),
        "lengths": lengths(result),
        **shape_stats(result),
        **({"scores": {"present": result.scored}} if scores else {}),
    }


def shape_stats(result: SplitResult) -> dict:
    """What the manifest records of the kept rows of one shape: ranked data's ``k`` (`group_size_stats`),
    unpaired data's ``labels`` (kept rows by label); nothing for pairs."""
    if result.shape == "ranked":
        return {"k": group_size_stats(result.group_sizes)}
    if result.shape == "unpaired":
        return {"labels": {name: result.labels[name] for name in (label_name(True), label_name(False))}}
    return {}


def counts(result: SplitResult) -> dict:
    shape_counts = {}
    if result.shape == "ranked":
        shape_counts = {
            "completions_dropped": dict(sorted(result.completions_dropped.items())),
            "first_completion_dropped": dict(sorted(result.first_completion_dropped.items())),
        }
    elif result.shape == "unpaired":
        shape_counts = {"kl_completions_truncated": result.kl_completions_truncated}
    return {
        "read": result.read,
        "kept": result.kept,
        **{event: result.events[event] for event in ROW_EVENTS},
        "dropped": dict(sorted(result.dropped.items())),
        "first_dropped": dict(sorted(result.first_dropped.items())),
        **shape_counts,
        "formats": dict(sorted(result.formats.items())),
        "unused_columns": dict(sorted(result.unused_columns.items())),
    }


def group_size_stats(sizes: Counter) -> dict:
    """The distribution of k (completions per kept ranked row): ``min``, ``max``, ``mean`` and ``counts``
    (k as text -> rows, by k)."""
    rows = sum(sizes.values())
    if not rows:
        return {"min": 0, "max": 0, "mean": 0.0, "counts": {}}
    return {
        "min": min(sizes),
        "max": max(sizes),
        "mean": round(sum(k * n for k, n in sizes.items()) / rows, 4),
        "counts": {str(k): sizes[k] for k in sorted(sizes)},
    }


def lengths(result: SplitResult) -> dict:
    return {"prompt": length_stats(result.prompt_lengths), "completion": length_stats(result.completion_lengths)}


def length_stats(values) -> dict[str, int]:
    """Percentiles (the smallest length at least q% of values do not exceed) and the maximum."""
    if not len(values):
        return {**{f"p{q}": 0 for q in PERCENTILES}, "max": 0}
    values = np.asarray(values)
    stats = {f"p{q}": int(np.percentile(values, q, method="inverted_cdf")) for q in PERCENTILES}
    return {**stats, "max": int(values.max())}


# ---------------------------------------------------------------------------------------------
# Progress and summary


class RowRateColumn(ProgressColumn):
    """A task's average rows per second so far."""

    def render(self, task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        if not elapsed or not task.completed:
            return Text("- rows/s", style="cyan")
        return Text(f"{task.completed / elapsed:,.0f} rows/s", style="cyan")


def rows_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold blue]prepare {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RowRateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


@contextmanager
def quiet_datasets_progress() -> Iterator[None]:
    """Silence `datasets`' own progress bars while writing (the summary reports the result)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def summary_table(results: dict[str, SplitResult], out: Path, seconds: float) -> Table:
    """Rows read/kept, truncated, dropped by reason and token-length percentiles, one column a split."""
    read = sum(r.read for r in results.values())
    caption = f"{read:,} rows in {seconds:.1f} s ({read / seconds:,.0f} rows/s)"
    table = column_table(f"dpokit prepare → {out}", caption, results)

    def row(label: str, value) -> None:
        table.add_row(label, *(str(value(r)) for r in results.values()))

    row("rows read", lambda r: r.read)
    row("rows kept", lambda r: r.kept)
    if any(r.shape == "ranked" for r in results.values()):
        row("completions kept", lambda r: len(r.completion_lengths))
        row("k min/mean/max", lambda r: "{min}/{mean:.2f}/{max}".format(**group_size_stats(r.group_sizes)))
        for reason in sorted(set().union(*(r.completions_dropped for r in results.values()))):
            row(f"completions dropped: {reason}", lambda r, reason=reason: r.completions_dropped[reason])
    if any(r.shape == "unpaired" for r in results.values()):
        for label in (True, False):
            row(f"{label_name(label)} kept", lambda r, label=label: r.labels[label_name(label)])
        row("KL completions cut", lambda r: r.kl_completions_truncated)
    row("truncated", lambda r: r.events["truncated"])
    for event, label in (
        ("truncated_prompt", "  prompt cut"),
        ("truncated_completion", "  completion cut"),
        ("retokenized", "retokenized at prompt boundary"),
        ("template_common_prefix", "template: prompt cut to shared text"),
    ):
        if any(r.events[event] for r in results.values()):
            row(label, lambda r, event=event: r.events[event])
    for reason in sorted(set().union(*(r.dropped for r in results.values()))):
        row(f"dropped: {reason}", lambda r, reason=reason: r.dropped[reason])
    for column in sorted(set().union(*(r.unused_columns for r in results.values()))):
        row(f"column not read: {column}", lambda r, column=column: r.unused_columns[column])
    if any(r.scored for r in results.values()):
        row("pairs with scores", lambda r: r.scored)
    for label in ("prompt", "completion"):
        row(
            f"{label} tokens p50/p90/p99/max",
            lambda r, label=label: "/".join(map(str, length_stats(getattr(r, f"{label}_lengths")).values())),
        )
    return table
