"""Looking into a reference cache: `dpokit cache info` (what it holds) and `dpokit cache verify`
(recompute a random sample live and report the largest difference)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
from rich.console import Console
from rich.table import Table

from dpokit.errors import DpokitError
from dpokit.reference.cache import RefCache, open_cache, short_value

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dpokit.fidelity import Layout

# `cache info` needs only the file; `verify` imports the model machinery when it runs.


def cache_info_table(cache: RefCache):
    """A rich table describing a cache: rows done per split, then what it was made from."""
    table = Table(title=f"reference cache {cache.path}", show_header=True)
    table.add_column("split", style="bold", overflow="fold")
    table.add_column("rows done / total", justify="right", overflow="fold")
    for split in cache.splits:
        state = "complete" if cache.is_complete(split) else "incomplete"
        table.add_row(split, f"{cache.rows_done[split]}/{cache.rows[split]} ({state})")
    table.add_section()
    for key in (
        "model",
        "adapter",
        "dtype",
        "attn_implementation",
        "per_token",
        "shape",
        "created",
        "dpokit_version",
        "format_version",
        "prepared",
    ):
        table.add_row(key, str(cache.attrs.get(key) or ("pairs" if key == "shape" else "none")))
    for key in ("weights_fingerprint", "adapter_fingerprint", "data_fingerprint", "tokenizer_fingerprint"):
        table.add_row(key, short_value(cache.attrs.get(key)))
    return table


@dataclass
class VerifyReport:
    """The outcome of `verify_cache`: the largest absolute difference and where it is."""

    max_difference: float = 0.0
    worst: str = ""  # "split row i (chosen)"
    token_mismatches: list[str] = field(default_factory=list)
    per_split: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # rows, max |Δ| chosen, rejected


# The default --tolerance by the cache's compute dtype: the recompute batches rows differently, and in bf16
# a sum over a completion's tokens moves by a few hundredths with the batch it is in.
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.1}


def verify_cache(
    cache_path: str,
    prepared_path: Optional[str] = None,
    model: Optional[str] = None,
    adapter: Optional[str] = None,
    sample: int = 32,
    tolerance: Optional[float] = None,
    batch_size: int = 8,
    seed: int = 0,
) -> VerifyReport:
    """Recompute `sample` random written rows of a cache live and compare; raise above `tolerance`.

    The prepared data, model and adapter default to what the cache records; the tolerance to one that fits
    its compute dtype (`DEFAULT_TOLERANCE`). The model runs in the dtype the cache was made with. Raises
    `DpokitError` if the cache was built from other inputs, if the largest absolute log-prob difference
    exceeds `tolerance`, or if a token count differs.
    """
    from dpokit.data.prepared import load_prepared
    from dpokit.fingerprint import reference_fingerprint
    from dpokit.model import default_device, load_reference, resolve_dtype
    from dpokit.reference.compute import announce, checked_layout

    if sample < 1:
        raise DpokitError(f"--sample must be at least 1 (rows to recompute), got {sample}")
    cache = open_cache(cache_path)
    prepared_path = prepared_path or cache.attrs.get("prepared")
    model = model or cache.attrs.get("model")
    if adapter is None and cache.attrs.get("adapter"):
        adapter = cache.attrs["adapter"]
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE.get(str(cache.attrs.get("dtype")), 1e-4)
    if not prepared_path or not model:
        raise DpokitError(
            f"{cache_path} does not record its prepared data and model; pass them: "
            f"dpokit cache verify {cache_path} PREPARED --model MODEL"
        )
    prepared = load_prepared(prepared_path)
    cache.check_matches(
        data_fingerprint=prepared.fingerprint,
        reference_fingerprint=reference_fingerprint(model, adapter),
        tokenizer_fingerprint=prepared.tokenizer_fingerprint,
    )
    chosen_rows = sample_written_rows(cache, sample, seed)
    if not chosen_rows:
        raise DpokitError(f"{cache_path} has no written rows to verify; run `{cache.rebuild_command()}` first")
    device = default_device()
    attn = cache.attrs["attn_implementation"]
    reference = load_reference(model, resolve_dtype(cache.attrs["dtype"], device), device, adapter, attn)
    layout = checked_layout(reference, prepared.split(next(iter(chosen_rows))), announce)
    report = VerifyReport()
    for split, rows in chosen_rows.items():
        compare_split(reference, prepared.split(split), cache, split, rows, batch_size, device, report, layout)
    Console().print(verify_table(report, cache_path, tolerance))
    if report.token_mismatches:
        raise DpokitError(
            f"{cache_path}: completion token counts differ from the prepared data at {', '.join(report.token_mismatches[:5])}; "
            f"rebuild it with `{cache.rebuild_command()} --overwrite`"
        )
    if report.max_difference > tolerance:
        raise DpokitError(
            f"{cache_path}: largest difference {report.max_difference:.3g} at {report.worst} exceeds the tolerance "
            f"{tolerance:g}; rebuild it with `{cache.rebuild_command()} --overwrite` (a bf16 cache needs a looser "
            "--tolerance, e.g. 0.1)"
        )
    return report


def sample_written_rows(cache: RefCache, sample: int, seed: int) -> dict[str, np.ndarray]:
    """Up to `sample` written rows drawn at random over all splits, ascending per split."""
    written = {split: np.flatnonzero(cache.done_mask(split)) for split in cache.splits}
    total = sum(len(rows) for rows in written.values())
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(sample, total), replace=False))
    chosen, offset = {}, 0
    for split, rows in written.items():
        mine = picks[(picks >= offset) & (picks < offset + len(rows))] - offset
        if len(mine):
            chosen[split] = rows[mine]
        offset += len(rows)
    return chosen


def compare_split(
    model: nn.Module,
    dataset,
    cache: RefCache,
    split: str,
    rows: np.ndarray,
    batch_size: int,
    device: torch.device,
    report: VerifyReport,
    layout: Layout,
) -> None:
    """Recompute `rows` of `split` and fold the differences from the cache into `report`."""
    from dpokit.data.prepared import pair_lengths
    from dpokit.reference.compute import batch_logps, plan_batches

    cached = cache.logps(split, require_done=False)
    side_max = {"chosen": 0.0, "rejected": 0.0}  # a ranked cache's completions count as "chosen"
    for index in plan_batches(rows, pair_lengths(dataset), batch_size):
        live = batch_logps(model, dataset, index, device, layout)
        for side, cached_logps, cached_tokens, live_logps, live_tokens, where in compared_values(cached, live, index):
            differences = np.abs(cached_logps - live_logps)
            side_max[side] = max(side_max[side], float(differences.max()))
            worst = int(np.argmax(differences))
            if differences[worst] > report.max_difference:
                report.max_difference = float(differences[worst])
                report.worst = f"{split} {where[worst]}"
            report.token_mismatches += [f"{split} {where[i]}" for i in np.flatnonzero(cached_tokens != live_tokens)]
    report.per_split[split] = (len(rows), side_max["chosen"], side_max["rejected"] if not cache.is_ranked else None)


def compared_values(cached, live, index: np.ndarray):
    """``(side, cached logps, cached tokens, live logps, live tokens, where)`` per side of a batch: a pair cache's
    chosen and rejected rows, a ranked cache's completions (``where`` names each value's row and completion)."""
    if hasattr(cached, "group_offsets"):
        offsets = cached.group_offsets.numpy()
        rows = np.concatenate([np.arange(offsets[g], offsets[g + 1]) for g in index])
        where = [f"row {int(g)} (completion {j})" for g in index for j in range(int(offsets[g + 1] - offsets[g]))]
        yield "chosen", cached.logps[rows].numpy(), cached.tokens[rows].numpy(), live.logps, live.tokens, where
        return
    for side in ("chosen", "rejected"):
        where = [f"row {int(i)} ({side})" for i in index]
        yield (
            side,
            getattr(cached, f"{side}_logps")[index].numpy(),
            getattr(cached, f"{side}_tokens")[index].numpy(),
            getattr(live, f"{side}_logps"),
            getattr(live, f"{side}_tokens"),
            where,
        )


def verify_table(report: VerifyReport, cache_path: str, tolerance: float) -> Table:
    """Per split: rows recomputed and the largest differences; the caption says pass or fail."""
    passed = report.max_difference <= tolerance and not report.token_mismatches
    table = Table(
        title=f"cache verify {cache_path}",
        caption=f"largest |Δ| {report.max_difference:.3g} (tolerance {tolerance:g}): {'ok' if passed else 'FAILED'}",
    )
    for column in ("split", "rows checked", "max |Δ| chosen (ranked: every completion)", "max |Δ| rejected"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, (rows, chosen, rejected) in report.per_split.items():
        table.add_row(split, str(rows), f"{chosen:.3g}", "-" if rejected is None else f"{rejected:.3g}")
    return table
