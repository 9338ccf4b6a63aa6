"""The reference cache from the sampler: `dpokit sample --ref-logps`, carried by `dpokit score`, written by
`dpokit select`.

When the model that samples is the reference (the usual on-policy round: sample from the SFT model, which DPO then
keeps as its reference), the sampling pass already holds it in memory. After each batch is generated, a
teacher-forced forward computes every completion's summed log-prob the way `dpokit ref-logps` does: the prompt
and its k completions collated as one ranked group (`dpokit.reference.compute.collated_rows`), run through
`forward_logps` (`dpokit.logps.concatenated_forward` under inference mode) in the layout ref-logps checks
against the model's own logits, with ref-logps's default dtype and attention implementation. Each record gains
``ref_logps`` and ``ref_tokens``, one per completion; the samples manifest's ``ref_logps`` records what a cache
made from them claims (the reference fingerprint, dtype, attention, layout).

`dpokit score` carries both through to ``scored.jsonl``; `dpokit select` copies the values of the completions it
writes into a cache of the prepared data (`write_selected_cache`), with the attributes a ref-logps cache of that
data has, every row done, so `dpokit train --ref-cache` and `dpokit cache verify` take it as they take ref-logps's:
a whole reference pass is saved. Sums only: per-token values (``ref-logps --per-token``) are not made this way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from dpokit.errors import DpokitError
from dpokit.fingerprint import combine_fingerprints
from dpokit.reference.cache import RANKED_DATASETS, ROW_DATASETS, RefCache, cache_attrs, write_cache_values

REF_KEYS = ("ref_logps", "ref_tokens")  # what a record carries with --ref-logps: one value per completion


# ----------------------------------------------------------------------------------------------
# sampling: the values


def manifest_entry(manifest: dict[str, Any], model: str) -> dict[str, Any]:
    """The samples manifest's ``ref_logps``: what a cache made from the records claims to be (`cache_attrs`'
    inputs), from the manifest's model, adapter, fingerprints and dtype. ``layout`` is filled in once the sampler
    has checked it on its first batch."""
    from dpokit.family import resolve_attn_implementation

    weights, adapter_weights = manifest["weights"], manifest["adapter_weights"]
    return {
        "model": manifest["model"],
        "adapter": manifest["adapter"],
        "weights_fingerprint": weights,
        "adapter_fingerprint": adapter_weights,
        # what `dpokit.fingerprint.reference_fingerprint(model, adapter)` computes, from the fingerprints at hand
        "reference_fingerprint": combine_fingerprints(weights, adapter_weights) if adapter_weights else weights,
        "dtype": manifest["dtype"],
        "attn_implementation": resolve_attn_implementation(model, "auto"),  # ref-logps's default
        "layout": None,
        "per_token": False,
    }


def group_rows(prompt_ids: list[list[int]], completions: list[list[list[int]]]) -> list[dict]:
    """Each prompt with its k completions as a ranked group, in `example_rows`' form (the scores play no part)."""
    return [
        {"prompt_ids": prompt, "completion_ids": group, "scores": [0.0] * len(group)}
        for prompt, group in zip(prompt_ids, completions)
    ]


def sampler_layout(model, rows: list[dict], announce: Callable[[str], None]):
    """The layout the log-probs are computed in: ref-logps's default, checked against the model's own logits on the
    shortest of `rows` (a process's first batch) as ref-logps checks its first rows; padded where the family needs
    it."""
    from dpokit.fidelity import CHECK_CANDIDATES, shortest_rows
    from dpokit.reference.compute import checked_layout_of_rows

    return checked_layout_of_rows(model, shortest_rows(rows[:CHECK_CANDIDATES]), announce)


def group_logps(model, rows: list[dict], layout, device) -> list[tuple[list[float], list[int]]]:
    """Per group of `rows`, its completions' summed log-probs and token counts: one forward, as `dpokit ref-logps`
    computes a batch of ranked groups. The log-probs are float32 values (a cache's), as Python floats."""
    from dpokit.model import pad_token_id
    from dpokit.reference.compute import collated_rows, forward_logps

    collated = collated_rows(rows, np.arange(len(rows)), pad_token_id(model), layout, device)
    outputs = forward_logps(model, collated, device)
    logps, tokens = outputs.logps.tolist(), outputs.tokens.tolist()  # [C], group by group
    values, start = [], 0
    for row in rows:
        stop = start + len(row["completion_ids"])
        values.append((logps[start:stop], tokens[start:stop]))
        start = stop
    return values


# ----------------------------------------------------------------------------------------------
# reading the records back


def record_problem(record: dict[str, Any], k: int) -> Optional[str]:
    """What is wrong with a record's reference values (None: k of each, finite log-probs, and token counts that are
    the completions' lengths)."""
    for key in REF_KEYS:
        if not isinstance(record.get(key), list) or len(record[key]) != k:
            return f"{key!r} is not a list of k={k} values (the samples' manifest says they were computed)"
    if not all(isinstance(value, (int, float)) and np.isfinite(value) for value in record["ref_logps"]):
        return f"'ref_logps' holds a value that is not a finite number: {record['ref_logps']}"
    lengths = [len(ids) for ids in record["completion_ids"]]
    if record["ref_tokens"] != lengths:
        return f"'ref_tokens' {record['ref_tokens']} are not the completions' lengths {lengths}"
    return None


# ----------------------------------------------------------------------------------------------
# selecting: the cache


@dataclass
class SelectedReference:
    """The reference values of the rows `dpokit select` writes to one split, in written order: a pair's chosen and
    rejected completion's, or every completion of a ranked group (one cache row each)."""

    ranked: bool
    columns: dict[str, list] = field(default_factory=dict)
    group_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.columns = {name: [] for name in (RANKED_DATASETS if self.ranked else ROW_DATASETS)}

    def add(self, record: dict[str, Any], positions: tuple[int, ...]) -> None:
        """A written row's values: `positions` are its completions' places in `record` (chosen, rejected; or the
        group's, in order)."""
        logps, tokens = record["ref_logps"], record["ref_tokens"]
        if self.ranked:
            self.columns["completion_logps"] += [logps[j] for j in positions]
            self.columns["completion_tokens"] += [tokens[j] for j in positions]
            self.group_sizes.append(len(positions))
            return
        chosen, rejected = positions
        for side, j in (("chosen", chosen), ("rejected", rejected)):
            self.columns[f"{side}_logps"].append(logps[j])
            self.columns[f"{side}_tokens"].append(tokens[j])

    @property
    def rows(self) -> int:
        return len(self.group_sizes) if self.ranked else len(self.columns["chosen_logps"])


def write_selected_cache(
    path: Path, entry: dict[str, Any], prepared, values: dict[str, SelectedReference], sampled_from: str
) -> RefCache:
    """The reference cache of `prepared` (just written by select) at `path`, its rows `values`, with the attributes
    a `dpokit ref-logps` cache of that data and reference has (`entry`: the samples manifest's ``ref_logps``), and
    ``sampled_from``: the samples folder its values come from."""
    from dpokit.data.prepared import group_token_counts, pair_token_counts

    for split, selected in values.items():
        dataset = prepared.split(split)
        if prepared.is_grouped:
            _, tokens, sizes = group_token_counts(dataset)
            same = sizes.tolist() == selected.group_sizes and tokens.tolist() == selected.columns["completion_tokens"]
        else:
            _, chosen, rejected = pair_token_counts(dataset)
            same = chosen.tolist() == selected.columns["chosen_tokens"] and (
                rejected.tolist() == selected.columns["rejected_tokens"]
            )
        if len(dataset) != selected.rows or not same:
            raise DpokitError(
                f"{prepared.path}: split {split!r} does not match the reference values selected for it; select again "
                "with --overwrite, or compute the cache with `dpokit ref-logps`"
            )
    attrs = cache_attrs(
        model=entry["model"],
        weights=entry["weights_fingerprint"],
        adapter=entry["adapter"],
        adapter_weights=entry["adapter_fingerprint"],
        prepared_path=str(prepared.path.resolve()),
        data_fingerprint=prepared.fingerprint,
        tokenizer_fingerprint=prepared.tokenizer_fingerprint,
        dtype=entry["dtype"],
        attn_implementation=entry["attn_implementation"],
        per_token=False,
        shape="ranked" if prepared.is_grouped else "pairs",
    )
    attrs["sampled_from"] = sampled_from
    if entry.get("layout"):  # checked against the model's own logits, as ref-logps records it
        attrs["checked_layout"] = entry["layout"]
    columns = {
        split: {name: np.asarray(v) for name, v in selected.columns.items()} for split, selected in values.items()
    }
    group_sizes = {split: np.asarray(s.group_sizes, dtype=np.int64) for split, s in values.items()}
    return write_cache_values(path, attrs, columns, group_sizes if prepared.is_grouped else None)
