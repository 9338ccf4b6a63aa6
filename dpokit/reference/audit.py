"""`dpokit cache audit`: what the reference model already thinks of the data, before any training.

From a finished cache and the prepared data it was built from, per split (docs/audit.md defines every number):

- the reference's own preference accuracy and its margin ``chosen_logp - rejected_logp`` (sums over the
  completion tokens, as the cache stores them), also per token (each side's sum divided by its token count);
- length bias: the completions' token counts and how their difference correlates with the margin;
- pairs whose chosen and rejected token ids are identical (no signal), and duplicate prompts, exact (same
  token ids) and near (`NEAR_DUPLICATE_RULE`);
- for pairs prepared with scores: the score margin, its correlation with the reference margin, and ties;
- the pairs the reference disagrees with most, previewed with the tokenizer the manifest names.

It prints tables, writes ``audit.json`` and two PNGs to one folder, and with ``--write-filtered`` writes the
kept rows as a new prepared dataset together with the matching cache (the rows' values copied, so training
needs no new reference pass).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dpokit import __version__, log
from dpokit.artifacts import check_replaceable, replace_atomically
from dpokit.data.prepared import COLUMNS, SCORE_COLUMNS, PreparedData, load_prepared, write_prepared
from dpokit.errors import DpokitError
from dpokit.metrics import column_table
from dpokit.reference.audit_stats import (
    EXACT_ONLY_RULE,
    EXAMPLES,
    NEAR_DUPLICATE_RULE,
    QUANTILES,
    correlation,
    distribution,
    duplicate_groups,
    duplicates_entry,
    preview,
    prompt_keys,
    row_keys,
)
from dpokit.reference.cache import CachedLogps, RefCache, open_cache, subset_cache
from dpokit.reference.group_audit import group_audit_record, print_group_audit

AUDIT_FILE = "audit.json"
PLOT_FILES = {"margins": "margins.png", "length_vs_margin": "length_vs_margin.png"}
# --drop reasons, applied in this order: a row dropped for several counts under the first.
DROP_REASONS = ("identical", "ref-disagrees", "dup-prompts")


@dataclass
class AuditOptions:
    """The settings of one `dpokit cache audit` run (the CLI's options, one field each)."""

    cache: str
    prepared: Optional[str] = None  # default: the prepared data the cache records
    out: Optional[str] = None  # default: `default_out_dir`
    top: int = 10
    write_filtered: Optional[str] = None
    drop: Sequence[str] = ()
    min_margin: float = 0.0
    filtered_cache: Optional[str] = None  # default: `default_filtered_cache`
    filter_eval: bool = False  # also filter splits other than train (eval metrics are then on selected pairs)
    overwrite: bool = False


@dataclass
class SplitRows:
    """One split's per-row values that the audit summarises: the cache's, and keys from the prepared rows."""

    dataset: Any  # the prepared split (`datasets.Dataset`)
    logps: CachedLogps
    identical: np.ndarray  # [N] bool: chosen and rejected token ids are the same
    prompt_ids: list[bytes]  # [N] each prompt's token ids: the exact-duplicate key
    near_keys: list  # [N] the near-duplicate key (`NEAR_DUPLICATE_RULE`), or the ids without a tokenizer
    scores: Optional[tuple[np.ndarray, np.ndarray]] = None  # [N] chosen, [N] rejected (float64, nan: none); or None

    @property
    def margin(self) -> np.ndarray:
        """``chosen_logp - rejected_logp`` per pair, float64."""
        return self.logps.chosen_logps.double().numpy() - self.logps.rejected_logps.double().numpy()

    @property
    def length_diff(self) -> np.ndarray:
        return (self.logps.chosen_tokens - self.logps.rejected_tokens).numpy()

    @property
    def normalised_margin(self) -> np.ndarray:
        """The difference of the per-token mean log-probs."""
        logps = self.logps
        chosen = logps.chosen_logps.double().numpy() / np.maximum(logps.chosen_tokens.numpy(), 1)
        rejected = logps.rejected_logps.double().numpy() / np.maximum(logps.rejected_tokens.numpy(), 1)
        return chosen - rejected


@dataclass
class Audit:
    """What `run_audit` found and wrote."""

    record: dict[str, Any]  # the content of audit.json
    out_dir: Path
    plots: list[Path] = field(default_factory=list)


def run_audit(options: AuditOptions, console: Optional[Console] = None) -> Audit:
    """Audit a finished cache over its prepared data; print tables, write audit.json and the plots, and with
    ``write_filtered`` the filtered prepared data and its cache. Every target is checked before any work."""
    console = console or log.console()
    drop = check_options(options)
    cache = open_cache(options.cache)
    prepared_path = options.prepared or cache.attrs.get("prepared")
    if not prepared_path:
        raise DpokitError(
            f"{cache.path} does not record its prepared data; pass it: dpokit cache audit {cache.path} --data PREPARED"
        )
    prepared = load_prepared(prepared_path)
    cache.check_matches(data_fingerprint=prepared.fingerprint, tokenizer_fingerprint=prepared.tokenizer_fingerprint)
    out_dir = Path(options.out) if options.out else default_out_dir(cache.path)
    inputs = (cache.path, prepared.path)
    check_replaceable(out_dir, "audit", overwrite=True, inputs=inputs)  # an earlier audit there is replaced
    if options.write_filtered:
        check_replaceable(
            options.write_filtered, "prepared", options.overwrite, inputs=inputs, option="--write-filtered"
        )
        filtered_cache = Path(options.filtered_cache or default_filtered_cache(options.write_filtered))
        check_replaceable(filtered_cache, "cache", options.overwrite, inputs=inputs, option="--filtered-cache")

    tokenizer, tokenizer_note = decoding_tokenizer(prepared)
    if tokenizer_note:
        log.note(tokenizer_note)
    if prepared.is_grouped:
        if options.write_filtered:
            raise DpokitError(
                f"--write-filtered reads pair caches only so far; {cache.path} holds {prepared.shape} data. Filter "
                "the source rows and prepare them again"
            )
        record = group_audit_record(cache, prepared, options.top, tokenizer)
        replace_atomically(out_dir, "audit", lambda tmp: write_record(tmp, record))
        print_group_audit(record, console)
        console.print(f"wrote {out_dir / AUDIT_FILE}", soft_wrap=True)
        return Audit(record=record, out_dir=out_dir)
    rows = {split: split_rows(cache, prepared, split, tokenizer) for split in cache.splits}
    train_keys = set(rows["train"].near_keys) if "train" in rows else set()
    near_rule = NEAR_DUPLICATE_RULE if tokenizer else EXACT_ONLY_RULE
    record = {
        "cache": str(cache.path.resolve()),
        "prepared": str(prepared.path.resolve()),
        "near_duplicate_rule": near_rule,
        "dpokit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "splits": {
            split: split_summary(values, options.top, tokenizer, None if split == "train" else train_keys)
            for split, values in rows.items()
        },
    }
    if options.write_filtered:
        record["filter"] = write_filtered(options, drop, cache, prepared, rows, filtered_cache, near_rule)
    audit = write_audit_dir(out_dir, record, rows, console)
    console.print(summary_table(record))
    for split, summary in record["splits"].items():
        if summary["disagreements"]:
            console.print(disagreements_table(split, summary["disagreements"]))
    console.print(f"wrote {out_dir / AUDIT_FILE}" + "".join(f", {path.name}" for path in audit.plots), soft_wrap=True)
    if "filter" in record:
        print_filter(record["filter"], console)
    return audit


def check_options(options: AuditOptions) -> list[str]:
    """Refuse option values that do not fit together, before any work; returns the --drop reasons."""
    drop = [reason.strip() for reason in options.drop if reason.strip()]
    for reason in drop:
        if reason not in DROP_REASONS:
            close = difflib.get_close_matches(reason, DROP_REASONS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise DpokitError(f"--drop {reason!r} is not a reason{hint}; choose from {', '.join(DROP_REASONS)}")
    if options.top < 0:
        raise DpokitError(f"--top {options.top} must be 0 or more")
    if drop and not options.write_filtered:
        raise DpokitError("--drop needs --write-filtered OUT: the folder to write the kept rows to")
    if options.write_filtered and not drop:
        raise DpokitError(f"--write-filtered needs --drop, e.g. --drop {','.join(DROP_REASONS)}")
    if options.min_margin != 0.0 and "ref-disagrees" not in drop:
        raise DpokitError("--min-margin sets the threshold of --drop ref-disagrees; add ref-disagrees to --drop")
    if options.filtered_cache and not options.write_filtered:
        raise DpokitError("--filtered-cache goes with --write-filtered OUT")
    return drop


def default_out_dir(cache_path: Path) -> Path:
    """``ref-audit/`` next to ``ref.h5``."""
    return cache_path.with_name(f"{cache_path.stem}-audit")


def default_filtered_cache(write_filtered: str | Path) -> Path:
    """``prepared-clean-ref.h5`` next to ``prepared-clean/``."""
    path = Path(write_filtered)
    return path.with_name(f"{path.name}-ref.h5")


# ---------------------------------------------------------------------------------------------
# Per-row values


def decoding_tokenizer(prepared: PreparedData):
    """(tokenizer, None) for the tokenizer the manifest names, or (None, why not): previews then show ids."""
    name = prepared.manifest.get("tokenizer", {}).get("name")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name), None
    except Exception as exc:  # a missing directory, no network for a hub name, ...: decoding is a nicety
        reason = " ".join(str(exc).split())[:200]
        return None, (
            f"the tokenizer {name!r} the manifest names did not load ({reason}): previews show token ids "
            "and near-duplicate prompts are exact duplicates only"
        )


def split_rows(cache: RefCache, prepared: PreparedData, split: str, tokenizer) -> SplitRows:
    """The cache's values of a finished split and the keys the duplicate and identical checks compare."""
    dataset = prepared.split(split)
    chosen_ids, rejected_ids = (row_keys(dataset, column) for column in COLUMNS[1:])
    prompt_ids, near_keys = prompt_keys(dataset, tokenizer)
    return SplitRows(
        dataset=dataset,
        logps=cache.logps(split),
        identical=np.array([c == r for c, r in zip(chosen_ids, rejected_ids)], dtype=bool),
        prompt_ids=prompt_ids,
        near_keys=near_keys,
        scores=split_scores(dataset),
    )


def split_scores(dataset) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """A split's ``(chosen_score, rejected_score)`` columns as float64 arrays, or None when it has no scores."""
    if SCORE_COLUMNS[0] not in dataset.column_names:
        return None
    return tuple(dataset.data.column(column).to_numpy().astype(np.float64) for column in SCORE_COLUMNS)


# ---------------------------------------------------------------------------------------------
# The numbers


def split_summary(rows: SplitRows, top: int, tokenizer, train_keys: Optional[set]) -> dict[str, Any]:
    """One split's entry of audit.json (docs/audit.md says what each number is)."""
    margin, normalised = rows.margin, rows.normalised_margin
    chosen_tokens, rejected_tokens = rows.logps.chosen_tokens.numpy(), rows.logps.rejected_tokens.numpy()
    exact, near = duplicate_groups(rows.prompt_ids), duplicate_groups(rows.near_keys)
    duplicates = {"exact": duplicates_entry(exact), "near": duplicates_entry(near)}
    if train_keys is not None:
        duplicates["in_train"] = sum(key in train_keys for key in rows.near_keys)
    return {
        "pairs": len(margin),
        "accuracy": float(np.mean(margin > 0)),
        "normalised_accuracy": float(np.mean(normalised > 0)),
        "margin": distribution(margin),
        "normalised_margin": distribution(normalised),
        "length": {
            "chosen_mean": float(chosen_tokens.mean()),
            "rejected_mean": float(rejected_tokens.mean()),
            "chosen_longer": float(np.mean(chosen_tokens > rejected_tokens)),
            "correlation_with_margin": correlation(rows.length_diff, margin),
        },
        "identical": {"count": int(rows.identical.sum()), "rows": np.flatnonzero(rows.identical)[:EXAMPLES].tolist()},
        "duplicate_prompts": duplicates,
        "disagreements": disagreements(margin, normalised, rows.dataset, top, tokenizer),
        **({"scores": scores_entry(rows.scores, margin)} if rows.scores is not None else {}),
    }


def scored_pairs(scores: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """[N] bool: pairs with both scores (a nan is a missing score)."""
    chosen, rejected = scores
    return ~np.isnan(chosen) & ~np.isnan(rejected)


def scores_entry(scores: tuple[np.ndarray, np.ndarray], margin: np.ndarray) -> dict[str, Any]:
    """What the data's own scores say, over the pairs with both scores: how many (``pairs``), the distribution of
    ``chosen_score - rejected_score`` (``margin``; None without any), its Pearson correlation with the reference
    margin, and pairs whose two scores are equal (``ties``: no preference in the data)."""
    chosen, rejected = scores
    scored = scored_pairs(scores)
    score_margin = chosen[scored] - rejected[scored]
    return {
        "pairs": int(scored.sum()),
        "margin": distribution(score_margin) if len(score_margin) else None,
        "correlation_with_reference_margin": correlation(score_margin, margin[scored]),
        "ties": int((score_margin == 0).sum()),
    }


def disagreements(margin: np.ndarray, normalised: np.ndarray, dataset, top: int, tokenizer) -> list[dict[str, Any]]:
    """The `top` pairs with the most negative margin (negative only), each with a short preview of its texts."""
    worst = np.argsort(margin, kind="stable")[:top]
    entries = []
    for row in worst[margin[worst] < 0]:
        ids = dataset[int(row)]
        entries.append(
            {
                "row": int(row),
                "margin": float(margin[row]),
                "normalised_margin": float(normalised[row]),
                **{column.removesuffix("_ids"): preview(ids[column], tokenizer) for column in COLUMNS},
            }
        )
    return entries


# ---------------------------------------------------------------------------------------------
# Filtering


def kept_rows(rows: SplitRows, drop: Sequence[str], min_margin: float) -> tuple[np.ndarray, dict[str, int]]:
    """Which rows the --drop reasons keep ([N] bool), and how many each dropped (first reason in `DROP_REASONS`).

    ``dup-prompts`` keeps the first kept row of each near-duplicate prompt group.
    """
    keep = np.ones(len(rows.identical), dtype=bool)
    dropped = {}
    for reason in (r for r in DROP_REASONS if r in drop):
        if reason == "identical":
            hit = rows.identical
        elif reason == "ref-disagrees":
            hit = rows.margin < min_margin
        else:
            hit = repeats_earlier(rows.near_keys, keep)
        dropped[reason] = int((hit & keep).sum())
        keep &= ~hit
    return keep, dropped


def repeats_earlier(keys: Sequence, keep: np.ndarray) -> np.ndarray:
    """[N] bool: a kept row whose key an earlier kept row has."""
    seen, hit = set(), np.zeros(len(keys), dtype=bool)
    for row in np.flatnonzero(keep):
        hit[row] = keys[row] in seen
        seen.add(keys[row])
    return hit


def write_filtered(
    options: AuditOptions,
    drop: list[str],
    cache: RefCache,
    prepared: PreparedData,
    rows: dict[str, SplitRows],
    cache_out: Path,
    near_rule: str,
) -> dict[str, Any]:
    """Write the kept rows as a prepared dataset (the filter in its manifest) and their cache; the filter record."""
    from dpokit.data.pipeline import quiet_datasets_progress

    kept, splits = {}, {}
    for split, values in rows.items():
        if split == "train" or options.filter_eval:
            keep, dropped = kept_rows(values, drop, options.min_margin)
        else:  # eval stays as it was: dropping the pairs the reference gets wrong would flatter every eval metric
            keep, dropped = np.ones(len(values.identical), dtype=bool), {}
        if not keep.any():
            raise DpokitError(
                f"--drop {','.join(drop)} drops every {split} row; nothing written. Drop fewer reasons"
                + (" or lower --min-margin" if "ref-disagrees" in drop else "")
            )
        kept[split] = np.flatnonzero(keep)
        splits[split] = {"rows_before": len(keep), "rows_after": len(kept[split]), "dropped": dropped}
    record = {
        "drop": drop,
        **({"min_margin": options.min_margin} if "ref-disagrees" in drop else {}),
        **({"near_duplicate_rule": near_rule} if "dup-prompts" in drop else {}),
        "source_cache": str(cache.path.resolve()),
        "source_prepared": str(prepared.path.resolve()),
        "source_data_fingerprint": prepared.fingerprint,
        "cache": str(cache_out.resolve()),  # the rows' reference values, copied from the source cache
        "splits": splits,
    }
    with quiet_datasets_progress():
        datasets = {split: rows[split].dataset.select(index).to_dataset() for split, index in kept.items()}
        out = write_prepared(
            options.write_filtered,
            datasets,
            filtered_manifest(prepared.manifest, datasets, record),
            overwrite=options.overwrite,
        )
    filtered = load_prepared(out)
    attrs = dict(
        cache.attrs,
        data_fingerprint=filtered.fingerprint,
        prepared=str(out.resolve()),
        derived_from=str(cache.path.resolve()),
        dpokit_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    subset_cache(cache, kept, cache_out, attrs)
    return {**record, "prepared": str(out.resolve())}


def filtered_manifest(source: dict[str, Any], datasets: dict, record: dict[str, Any]) -> dict[str, Any]:
    """The source's manifest with the kept rows' counts and lengths, and the filter (`write_prepared` adds the
    format version, data fingerprint and file digests)."""
    manifest = {
        key: value for key, value in source.items() if key not in ("format_version", "data_fingerprint", "files")
    }
    manifest["splits"] = {
        split: {
            **source["splits"].get(split, {}),
            "rows": len(dataset),
            "kept": len(dataset),
            "lengths": token_lengths([dataset]),
        }
        for split, dataset in datasets.items()
    }
    if "scores" in manifest:  # pairs with both scores among the kept rows, as `dpokit prepare` counts them
        present = {split: int(scored_pairs(split_scores(dataset)).sum()) for split, dataset in datasets.items()}
        for split, count in present.items():
            manifest["splits"][split]["scores"] = {"present": count}
        manifest["scores"] = {"present": sum(present.values())}
    manifest["lengths"] = token_lengths(datasets.values())
    manifest["filter"] = record
    return manifest


def token_lengths(datasets) -> dict[str, Any]:
    """Prompt and completion length percentiles over `datasets`, as `dpokit prepare` records them."""
    from dpokit.data.pipeline import length_stats
    from dpokit.data.prepared import pair_token_counts

    prompt, completion = [], []
    for dataset in datasets:
        prompt_tokens, chosen_tokens, rejected_tokens = pair_token_counts(dataset)
        prompt += prompt_tokens.tolist()
        completion += chosen_tokens.tolist() + rejected_tokens.tolist()
    return {"prompt": length_stats(prompt), "completion": length_stats(completion)}


# ---------------------------------------------------------------------------------------------
# Output


def write_audit_dir(out_dir: Path, record: dict[str, Any], rows: dict[str, SplitRows], console: Console) -> Audit:
    """Write audit.json and the plots to `out_dir` (replaced whole); without matplotlib, say so once and skip the plots."""
    from dpokit.metrics import pyplot

    try:
        plt = pyplot("drawing the audit plots")
    except DpokitError as exc:
        log.note(f"no plots: {exc}")
        plt = None

    def write(tmp: Path) -> None:
        write_record(tmp, record)
        if plt is not None:
            draw_plots(plt, tmp, rows, record)

    replace_atomically(out_dir, "audit", write)
    plots = [out_dir / name for name in PLOT_FILES.values()] if plt is not None else []
    return Audit(record=record, out_dir=out_dir, plots=plots)


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """Make `folder` with the audit's audit.json in it."""
    folder.mkdir()
    (folder / AUDIT_FILE).write_text(json.dumps(record, indent=2) + "\n")


def draw_plots(plt, folder: Path, rows: dict[str, SplitRows], record: dict[str, Any]) -> None:
    """One PNG per entry of `PLOT_FILES`, each split in its own colour."""
    for name, draw in (("margins", draw_margins), ("length_vs_margin", draw_length_bias)):
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax, rows, record)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / PLOT_FILES[name], dpi=100)
        plt.close(fig)


def draw_margins(ax, rows: dict[str, SplitRows], record: dict[str, Any]) -> None:
    """A histogram of the margins, the same bins for every split."""
    margins = {split: values.margin for split, values in rows.items()}
    pooled = np.concatenate(list(margins.values()))
    bins = np.histogram_bin_edges(pooled, bins=min(50, max(10, len(pooled) // 10)))
    for split, margin in margins.items():
        ax.hist(margin, bins=bins, alpha=0.5, label=split)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set(xlabel="reference margin: chosen - rejected log-prob", ylabel="pairs", title="reference margins")


def draw_length_bias(ax, rows: dict[str, SplitRows], record: dict[str, Any]) -> None:
    """The length difference against the margin, with their correlation."""
    for split, values in rows.items():
        r = record["splits"][split]["length"]["correlation_with_margin"]
        label = f"{split} (r = {r:.2f})" if r is not None else split
        ax.scatter(values.length_diff, values.margin, s=8, alpha=0.5, label=label)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(xlabel="chosen - rejected completion tokens", ylabel="reference margin", title="length bias")


def summary_table(record: dict[str, Any]) -> Table:
    """The numbers, one column a split."""
    splits = record["splits"]
    caption = f"near-duplicate prompts: {record['near_duplicate_rule']}"
    table = column_table(f"cache audit {record['cache']}", caption, splits)

    def row(label: str, value) -> None:
        table.add_row(label, *(value(s) for s in splits.values()))

    def spread(d: dict) -> str:
        return f"{d['mean']:.3g} ± {d['std']:.3g}"

    def quantiles(d: dict) -> str:
        return " / ".join(f"{d[f'p{round(q * 100)}']:.3g}" for q in QUANTILES)

    def found(entry: dict, count: str) -> str:
        return f"{entry[count]} (rows {', '.join(map(str, entry['rows']))})" if entry[count] else "0"

    def duplicates(entry: dict) -> str:
        return f"{entry['rows']} ({entry['groups']})"

    row("pairs", lambda s: str(s["pairs"]))
    row("reference accuracy (margin > 0)", lambda s: f"{s['accuracy']:.1%}")
    row("margin mean ± std", lambda s: spread(s["margin"]))
    row("margin p5 / p25 / p50 / p75 / p95", lambda s: quantiles(s["margin"]))
    row("per-token accuracy", lambda s: f"{s['normalised_accuracy']:.1%}")
    row("per-token margin mean ± std", lambda s: spread(s["normalised_margin"]))
    row("per-token margin p5 / p25 / p50 / p75 / p95", lambda s: quantiles(s["normalised_margin"]))
    row(
        "tokens chosen / rejected (mean)",
        lambda s: f"{s['length']['chosen_mean']:.1f} / {s['length']['rejected_mean']:.1f}",
    )
    row("chosen longer", lambda s: f"{s['length']['chosen_longer']:.1%}")
    row(
        "corr(length diff, margin)",
        lambda s: "n/a"
        if s["length"]["correlation_with_margin"] is None
        else f"{s['length']['correlation_with_margin']:.2f}",
    )
    row("identical chosen/rejected", lambda s: found(s["identical"], "count"))
    row("exact-duplicate prompts: rows (groups)", lambda s: duplicates(s["duplicate_prompts"]["exact"]))
    row("near-duplicate prompts: rows (groups)", lambda s: duplicates(s["duplicate_prompts"]["near"]))
    if any("in_train" in s["duplicate_prompts"] for s in splits.values()):
        row("prompts also in train (near)", lambda s: str(s["duplicate_prompts"].get("in_train", "")))
    if any("scores" in s for s in splits.values()):
        row("score margin mean ± std / corr(·, margin) / ties", lambda s: score_cell(s.get("scores")))
    return table


def score_cell(entry: Optional[dict]) -> str:
    """The score margin's mean and spread, its correlation with the reference margin, and the ties, in one cell."""
    if entry is None or entry["margin"] is None:
        return "n/a"
    r = entry["correlation_with_reference_margin"]
    return f"{entry['margin']['mean']:.3g} ± {entry['margin']['std']:.3g} / {'n/a' if r is None else f'{r:.2f}'} / {entry['ties']}"


def disagreements_table(split: str, entries: list[dict[str, Any]]) -> Table:
    """The pairs the reference disagrees with most in `split`."""
    table = Table(title=f"{split}: the reference prefers the rejected completion most", show_lines=False)
    for column in ("row", "margin", "per token", "prompt", "chosen", "rejected"):
        table.add_column(
            column, justify="right" if column in ("row", "margin", "per token") else "left", overflow="fold"
        )
    for e in entries:
        table.add_row(
            str(e["row"]),
            f"{e['margin']:.3g}",
            f"{e['normalised_margin']:.3g}",
            *(escape(e[side]) for side in ("prompt", "chosen", "rejected")),
        )
    return table


def print_filter(record: dict[str, Any], console: Console) -> None:
    """What --write-filtered wrote, and the command that trains on it."""
    for split, counts in record["splits"].items():
        reasons = ", ".join(f"{reason} {n}" for reason, n in counts["dropped"].items())
        console.print(
            f"{split}: kept {counts['rows_after']} of {counts['rows_before']} pairs (dropped: {reasons})",
            soft_wrap=True,
        )
    console.print(
        f"wrote {record['prepared']} and its reference cache {record['cache']} (values copied from "
        f"{record['source_cache']}); train on them with:",
        soft_wrap=True,
    )
    console.print(
        f"  dpokit train --data {record['prepared']} --ref-cache {record['cache']} ...", soft_wrap=True, highlight=False
    )
