"""`dpokit cache audit` of a cache of groups: ranked data (k scored completions per prompt) and unpaired data
(one completion with a desirable/undesirable label, and its mismatched KL completion).

What the reference already thinks of the data, per split (docs/audit.md, "Ranked and unpaired data"):

- ranked: how often the reference orders two completions as their scores do (summed and per-token log-probs),
  the groups it orders entirely right, its margin between each group's best and worst, length bias (does a longer
  completion score higher within its group), groups whose differently scored completions are the same ids,
  duplicate prompts, and the groups whose best completion the reference likes least;
- unpaired: the reference's log-probs by label, how often a desirable completion is more likely per token than
  an undesirable one (the AUC), length by label, how often the KL completion is less likely than the example's
  own (it answers another prompt), and duplicate prompts.

`dpokit.reference.audit` prints its table and writes ``audit.json``; ``--write-filtered`` reads pair caches only.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dpokit import __version__
from dpokit.data.prepared import PreparedData
from dpokit.metrics import column_table
from dpokit.reference.audit_stats import (
    EXACT_ONLY_RULE,
    EXAMPLES,
    NEAR_DUPLICATE_RULE,
    correlation,
    distribution,
    duplicate_groups,
    duplicates_entry,
    preview,
    prompt_keys,
)
from dpokit.reference.cache import RefCache


def group_audit_record(cache: RefCache, prepared: PreparedData, top: int, tokenizer) -> dict[str, Any]:
    """The content of audit.json for a ranked or unpaired cache (`prepared` checked to be its data)."""
    summarise = unpaired_summary if prepared.is_unpaired else ranked_summary
    splits = {split: split_values(cache, prepared, split, tokenizer) for split in cache.splits}
    train_keys = set(splits["train"]["near_keys"]) if "train" in splits else set()
    return {
        "cache": str(cache.path.resolve()),
        "prepared": str(prepared.path.resolve()),
        "shape": prepared.shape,
        "near_duplicate_rule": NEAR_DUPLICATE_RULE if tokenizer else EXACT_ONLY_RULE,
        "dpokit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "splits": {
            split: {
                **summarise(values, top, tokenizer),
                "duplicate_prompts": prompt_duplicates(values, None if split == "train" else train_keys),
            }
            for split, values in splits.items()
        },
    }


def print_group_audit(record: dict[str, Any], console: Console) -> None:
    """The audit's table, and each split's groups the reference gets most wrong."""
    console.print(summary_table(record))
    for split, summary in record["splits"].items():
        if summary.get("disagreements"):
            console.print(disagreements_table(split, summary["disagreements"]))


def split_values(cache: RefCache, prepared: PreparedData, split: str, tokenizer) -> dict[str, Any]:
    """One split's cached values per completion and its groups' scores, ids and prompt keys."""
    dataset = prepared.split(split)
    cached = cache.logps(split)
    offsets = cached.group_offsets.numpy()
    logps = cached.logps.double().numpy()
    tokens = cached.tokens.numpy()
    exact, near = prompt_keys(dataset, tokenizer)
    return {
        "dataset": dataset,
        "offsets": offsets,
        "logps": logps,
        "tokens": tokens,
        "per_token": logps / np.maximum(tokens, 1),
        "scores": np.concatenate([np.asarray(s, dtype=np.float64) for s in dataset.data.column("scores").to_pylist()])
        if len(dataset)
        else np.zeros(0),
        "exact_keys": exact,
        "near_keys": near,
    }


def prompt_duplicates(values: dict[str, Any], train_keys: Optional[set]) -> dict[str, Any]:
    duplicates = {
        "exact": duplicates_entry(duplicate_groups(values["exact_keys"])),
        "near": duplicates_entry(duplicate_groups(values["near_keys"])),
    }
    if train_keys is not None:
        duplicates["in_train"] = sum(key in train_keys for key in values["near_keys"])
    return duplicates


# ---------------------------------------------------------------------------------------------
# Ranked groups


def ranked_summary(values: dict[str, Any], top: int, tokenizer) -> dict[str, Any]:
    """One ranked split's entry of audit.json."""
    offsets, scores, logps, per_token, tokens = (
        values[k] for k in ("offsets", "scores", "logps", "per_token", "tokens")
    )
    completion_ids = values["dataset"].data.column("completion_ids").to_pylist()
    right = right_per_token = ordered = whole = 0
    margins, length_score, longest_best, same_ids = [], [], [], []
    for g in range(len(offsets) - 1):
        span = slice(offsets[g], offsets[g + 1])
        s, lp, pt, n = scores[span], logps[span], per_token[span], tokens[span]
        above = s[:, None] > s[None, :]  # [i, j]: i scores above j
        group_right = above & (lp[:, None] > lp[None, :])
        right += int(group_right.sum())
        right_per_token += int((above & (pt[:, None] > pt[None, :])).sum())
        ordered += int(above.sum())
        whole += bool(above.any()) and int(group_right.sum()) == int(above.sum())
        best, worst = int(np.argmax(s)), int(np.argmin(s))
        margins.append(lp[best] - lp[worst])
        length_score += list(zip(n - n.mean(), s - s.mean()))
        longest_best.append(bool(s[int(np.argmax(n))] == s.max()))
        ids = completion_ids[g]
        if any(ids[i] == ids[j] for i, j in zip(*np.nonzero(above))):
            same_ids.append(g)
    margins = np.array(margins)
    centred = np.array(length_score) if length_score else np.zeros((0, 2))
    groups = len(offsets) - 1
    return {
        "groups": groups,
        "completions": int(offsets[-1]),
        "k": {
            "min": int(np.diff(offsets).min()),
            "mean": float(np.diff(offsets).mean()),
            "max": int(np.diff(offsets).max()),
        },
        "pair_accuracy": right / ordered if ordered else None,
        "normalised_pair_accuracy": right_per_token / ordered if ordered else None,
        "scored_pairs": ordered,
        "groups_in_order": whole / groups if groups else None,
        "best_worst_margin": distribution(margins),
        "length": {
            "completion_mean": float(tokens.mean()),
            "correlation_with_score": correlation(centred[:, 0], centred[:, 1]),
            "longest_is_best": float(np.mean(longest_best)),
        },
        "identical": {"count": len(same_ids), "groups": same_ids[:EXAMPLES]},
        "disagreements": ranked_disagreements(values, margins, top, tokenizer),
    }


def ranked_disagreements(values: dict[str, Any], margins: np.ndarray, top: int, tokenizer) -> list[dict[str, Any]]:
    """The `top` groups whose best completion the reference likes least against their worst (negative only)."""
    offsets, scores, dataset = values["offsets"], values["scores"], values["dataset"]
    entries = []
    worst_first = np.argsort(margins, kind="stable")[:top]
    for g in worst_first[margins[worst_first] < 0]:
        row = dataset[int(g)]
        s = scores[offsets[g] : offsets[g + 1]]
        best, worst = int(np.argmax(s)), int(np.argmin(s))
        entries.append(
            {
                "group": int(g),
                "margin": float(margins[g]),
                "scores": [float(s[best]), float(s[worst])],
                "prompt": preview(row["prompt_ids"], tokenizer),
                "best": preview(row["completion_ids"][best], tokenizer),
                "worst": preview(row["completion_ids"][worst], tokenizer),
            }
        )
    return entries


# ---------------------------------------------------------------------------------------------
# Unpaired examples


def unpaired_summary(values: dict[str, Any], top: int, tokenizer) -> dict[str, Any]:
    """One unpaired split's entry of audit.json (each group: the completion, then its KL completion)."""
    own = values["offsets"][:-1]
    desirable = values["scores"][own] > 0.5
    logps, per_token, tokens = values["logps"][own], values["per_token"][own], values["tokens"][own]
    kl_per_token = values["per_token"][own + 1]

    def by_label(array: np.ndarray) -> dict[str, Optional[float]]:
        return {
            label: float(array[mask].mean()) if mask.any() else None
            for label, mask in (("desirable", desirable), ("undesirable", ~desirable))
        }

    return {
        "examples": int(len(own)),
        "desirable": int(desirable.sum()),
        "undesirable": int((~desirable).sum()),
        "logps": by_label(logps),
        "per_token_logps": by_label(per_token),
        "normalised_auc": auc(per_token[desirable], per_token[~desirable]),
        "length": {**by_label(tokens.astype(np.float64)), "correlation_with_label": correlation(tokens, desirable)},
        "kl_completion_less_likely": float(np.mean(kl_per_token < per_token)) if len(own) else None,
    }


def auc(positive: np.ndarray, negative: np.ndarray) -> Optional[float]:
    """The probability that a random `positive` value exceeds a random `negative` one (ties count half): the
    Mann-Whitney AUC; None without both."""
    if not len(positive) or not len(negative):
        return None
    above = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
    return float(above / (len(positive) * len(negative)))


# ---------------------------------------------------------------------------------------------
# Output


def summary_table(record: dict[str, Any]) -> Table:
    """The numbers, one column a split."""
    splits = record["splits"]
    table = column_table(
        f"cache audit {record['cache']} ({record['shape']} data)",
        f"near-duplicate prompts: {record['near_duplicate_rule']}",
        splits,
    )

    def row(label: str, value) -> None:
        table.add_row(label, *(value(s) for s in splits.values()))

    def share(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    def number(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:.3g}"

    if record["shape"] == "ranked":
        row("groups (completions)", lambda s: f"{s['groups']} ({s['completions']})")
        row("k min / mean / max", lambda s: f"{s['k']['min']} / {s['k']['mean']:.2f} / {s['k']['max']}")
        row("reference pair accuracy", lambda s: share(s["pair_accuracy"]))
        row("per-token pair accuracy", lambda s: share(s["normalised_pair_accuracy"]))
        row("groups in the scores' order", lambda s: share(s["groups_in_order"]))
        row("best - worst margin mean", lambda s: number(s["best_worst_margin"]["mean"]))
        row("corr(length, score) in groups", lambda s: number(s["length"]["correlation_with_score"]))
        row("longest completion is best", lambda s: share(s["length"]["longest_is_best"]))
        row("groups with same ids, other scores", lambda s: str(s["identical"]["count"]))
    else:
        row("examples (desirable / undesirable)", lambda s: f"{s['examples']} ({s['desirable']} / {s['undesirable']})")
        row(
            "per-token log-prob desirable / undesirable",
            lambda s: " / ".join(number(s["per_token_logps"][label]) for label in ("desirable", "undesirable")),
        )
        row("per-token AUC (desirable above)", lambda s: number(s["normalised_auc"]))
        row(
            "tokens desirable / undesirable",
            lambda s: " / ".join(number(s["length"][label]) for label in ("desirable", "undesirable")),
        )
        row("corr(length, label)", lambda s: number(s["length"]["correlation_with_label"]))
        row("KL completion less likely", lambda s: share(s["kl_completion_less_likely"]))
    row("exact-duplicate prompts: rows (groups)", lambda s: duplicates(s["duplicate_prompts"]["exact"]))
    row("near-duplicate prompts: rows (groups)", lambda s: duplicates(s["duplicate_prompts"]["near"]))
    if any("in_train" in s["duplicate_prompts"] for s in splits.values()):
        row("prompts also in train (near)", lambda s: str(s["duplicate_prompts"].get("in_train", "")))
    return table


def duplicates(entry: dict) -> str:
    return f"{entry['rows']} ({entry['groups']})"


def disagreements_table(split: str, entries: list[dict[str, Any]]) -> Table:
    """The groups whose best completion the reference likes least in `split`."""
    table = Table(title=f"{split}: the reference prefers the worst completion most", show_lines=False)
    for column in ("group", "margin", "scores", "prompt", "best", "worst"):
        table.add_column(column, justify="right" if column in ("group", "margin") else "left", overflow="fold")
    for e in entries:
        table.add_row(
            str(e["group"]),
            f"{e['margin']:.3g}",
            " > ".join(f"{v:g}" for v in e["scores"]),
            *(escape(e[side]) for side in ("prompt", "best", "worst")),
        )
    return table
