"""The numbers and keys both cache audits compute: pairs (`dpokit.reference.audit`) and groups
(`dpokit.reference.group_audit`): distributions, correlations, duplicate prompts and text previews."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional, Sequence

import numpy as np

from dpokit.fingerprint import numpy_view

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
EXAMPLES = 10  # row indices (or groups) listed per finding
PREVIEW_CHARS = 60
NEAR_DUPLICATE_RULE = "decoded text (special tokens skipped) equal after casefolding and collapsing whitespace"
EXACT_ONLY_RULE = "prompt token ids equal (the tokenizer did not load, so no text comparison)"


def prompt_keys(dataset, tokenizer) -> tuple[list[bytes], list]:
    """Each row's exact-duplicate key (its prompt's token ids) and near-duplicate key (`NEAR_DUPLICATE_RULE`; the
    exact key without a tokenizer)."""
    exact = row_keys(dataset, "prompt_ids")
    if tokenizer is None:
        return exact, exact
    texts = tokenizer.batch_decode(dataset.data.column("prompt_ids").to_pylist(), skip_special_tokens=True)
    return exact, [" ".join(text.casefold().split()) for text in texts]


def row_keys(dataset, column: str) -> list[bytes]:
    """Each row's token ids in `column` as bytes (equal ids, equal bytes), read from the Arrow buffers."""
    array = dataset.data.column(column).combine_chunks()
    offsets, values = numpy_view(array.offsets), numpy_view(array.values)
    return [values[offsets[i] : offsets[i + 1]].tobytes() for i in range(len(array))]


def distribution(values: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation, min, the `QUANTILES` (``p5`` ...) and max."""
    quantiles = {f"p{round(q * 100)}": float(np.quantile(values, q)) for q in QUANTILES}
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        **quantiles,
        "max": float(values.max()),
    }


def correlation(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    """Pearson's correlation, or None when either side is constant (it is undefined then)."""
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def duplicate_groups(keys: Sequence) -> list[list[int]]:
    """The row indices of each key more than one row has, groups in the order of their first row."""
    groups = defaultdict(list)
    for row, key in enumerate(keys):
        groups[key].append(row)
    return [group for group in groups.values() if len(group) > 1]


def duplicates_entry(groups: list[list[int]]) -> dict[str, Any]:
    """``rows``: rows that repeat an earlier row's prompt (what dropping duplicates removes); ``groups``."""
    return {"rows": sum(len(group) - 1 for group in groups), "groups": len(groups), "examples": groups[:EXAMPLES]}


def preview(ids: list[int], tokenizer) -> str:
    """The start of the decoded text on one line (of the ids, without a tokenizer)."""
    text = " ".join(tokenizer.decode(ids, skip_special_tokens=True).split()) if tokenizer else str(list(ids))
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"
