"""`dpokit inspect`: what `dpokit prepare` produced, decoded.

A few rows of a prepared split, each part (prompt, chosen, rejected; a ranked row's completions with their
scores; an unpaired row's completion, label and KL completion) decoded with the tokenizer the manifest records,
special tokens kept and highlighted, with its token count; then the manifest's counts per split. The text shown
is exactly ``tokenizer.decode(ids, skip_special_tokens=False)`` of the stored ids: what training sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dpokit.data.prepared import SCORE_COLUMNS, PreparedData, load_prepared
from dpokit.errors import DpokitError
from dpokit.fingerprint import tokenizer_fingerprint

SPECIAL_STYLE = "bold magenta"  # how a special token (a template's role header, EOS) is shown


@dataclass
class InspectedPart:
    """One decoded part of a row: its name (``prompt``, ``chosen``, ``completion 2``), text and token count, and
    its score or label when the data has one."""

    name: str
    ids: list[int]
    text: str
    score: Optional[float] = None
    label: Optional[str] = None

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass
class InspectedRow:
    index: int
    parts: list[InspectedPart]


def inspection_tokenizer(prepared: PreparedData, name: Optional[str] = None):
    """The tokenizer the manifest records (or `name`), with the manifest's chat template, checked against the
    manifest's tokenizer fingerprint: decoding with another vocabulary would show other text."""
    from transformers import AutoTokenizer

    recorded = prepared.manifest.get("tokenizer", {})
    source = name or recorded.get("name")
    if not source:
        raise DpokitError(f"{prepared.path}: the manifest names no tokenizer; pass --tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for a bad name or directory
        raise DpokitError(
            f"could not load the tokenizer {source!r} that {prepared.path} was prepared with: {exc}; pass --tokenizer"
        ) from exc
    if "chat_template" in prepared.manifest:
        tokenizer.chat_template = prepared.manifest["chat_template"]
    expected = recorded.get("fingerprint")
    if expected and tokenizer_fingerprint(tokenizer) != expected:
        raise DpokitError(
            f"the tokenizer {source!r} is not the one {prepared.path} was prepared with (its fingerprint differs); "
            "pass the right one with --tokenizer"
        )
    return tokenizer


def decoded(tokenizer, name: str, ids: list[int], **extra) -> InspectedPart:
    return InspectedPart(name, list(ids), tokenizer.decode(ids, skip_special_tokens=False), **extra)


def inspected_rows(prepared: PreparedData, tokenizer, split: str = "train", rows: int = 3, start: int = 0):
    """Rows ``start..start+rows-1`` of `split`, decoded part by part (`InspectedRow`)."""
    data = prepared.split(split)
    if not 0 <= start < len(data):
        raise DpokitError(f"--start {start} is outside the {split} split's {len(data)} rows")
    out = []
    for index in range(start, min(len(data), start + max(0, rows))):
        row = data[index]
        parts = [decoded(tokenizer, "prompt", row["prompt_ids"])]
        if prepared.is_unpaired:
            completion, kl_completion = row["completion_ids"]
            label = "desirable" if row["scores"][0] > 0.5 else "undesirable"
            parts.append(decoded(tokenizer, "completion", completion, label=label))
            parts.append(decoded(tokenizer, "KL completion", kl_completion))
        elif prepared.is_ranked:
            for k, (ids, score) in enumerate(zip(row["completion_ids"], row["scores"])):
                parts.append(decoded(tokenizer, f"completion {k}", ids, score=score))
        else:
            for side, column in zip(("chosen", "rejected"), SCORE_COLUMNS):
                parts.append(decoded(tokenizer, side, row[f"{side}_ids"], score=row.get(column)))
        out.append(InspectedRow(index, parts))
    return out


def special_tokens(tokenizer) -> list[str]:
    """The texts of the tokenizer's special tokens (those `decode` would skip), longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names = set(tokenizer.all_special_tokens) | {token.content for token in added.values() if token.special}
    return sorted((name for name in names if name), key=len, reverse=True)


def part_panel(part: InspectedPart, specials: list[str]) -> Panel:
    text = Text(part.text)
    text.highlight_words(specials, style=SPECIAL_STYLE)
    title = f"{part.name}: {part.tokens} tokens"
    if part.score is not None:
        title += f", score {part.score:g}" if not math.isnan(part.score) else ", no score"
    if part.label is not None:
        title += f", {part.label}"
    return Panel(text, title=title, title_align="left", border_style="dim")


def counts_table(prepared: PreparedData) -> Table:
    """The manifest's counts, one column a split: rows read, kept, dropped by reason, columns not read, scores."""
    splits = prepared.manifest.get("splits", {})
    table = Table(title=f"{prepared.path}: {prepared.shape}", title_justify="left")
    table.add_column("")
    for name in splits:
        table.add_column(name, justify="right")

    def add(label: str, value) -> None:
        table.add_row(label, *(str(value(split)) for split in splits.values()))

    add("source", lambda s: s.get("source", ""))
    add("rows read", lambda s: s.get("read", ""))
    add("rows kept", lambda s: s.get("kept", s.get("rows", "")))
    for reason in sorted({reason for s in splits.values() for reason in s.get("dropped", {})}):
        add(f"dropped: {reason}", lambda s, reason=reason: s.get("dropped", {}).get(reason, 0))
    for column in sorted({column for s in splits.values() for column in s.get("unused_columns", {})}):
        add(f"column not read: {column}", lambda s, column=column: s.get("unused_columns", {}).get(column, 0))
    if prepared.has_scores:
        add("pairs with scores", lambda s: s.get("scores", {}).get("present", 0))
    for part in ("prompt", "completion"):
        add(
            f"{part} tokens p50/p90/p99/max",
            lambda s, part=part: "/".join(str(v) for v in s.get("lengths", {}).get(part, {}).values()),
        )
    return table


def inspect_prepared(
    path: str | Path,
    split: str = "train",
    rows: int = 3,
    start: int = 0,
    tokenizer_name: Optional[str] = None,
    console: Optional[Console] = None,
) -> list[InspectedRow]:
    """Print `rows` decoded rows of `split` of the prepared data at `path` and the manifest's counts; returns
    the rows shown."""
    from dpokit import log

    console = console or log.console()
    prepared = load_prepared(path)
    tokenizer = inspection_tokenizer(prepared, tokenizer_name)
    shown = inspected_rows(prepared, tokenizer, split, rows, start)
    specials = special_tokens(tokenizer)
    for row in shown:
        console.print(
            Panel(
                Group(*(part_panel(part, specials) for part in row.parts)),
                title=f"{split} row {row.index}",
                title_align="left",
            )
        )
    console.print(counts_table(prepared))
    return shown
