"""The reference pass (`dpokit ref-logps`): run the frozen reference once over prepared data into ``ref.h5``.

For each split, the rows not yet done are sorted by length (longest first, so an out-of-memory
batch shows up at the start, not hours in) and cut into batches, so a batch holds rows of similar
length and little padding. Each batch goes through `dpokit.logps.concatenated_forward` under
``torch.inference_mode()``. Results are written by example index, so neither the order nor the
batch size changes the file.

With N processes, the batches are dealt round-robin to the ranks; after each step every rank's
results are gathered to rank 0, which alone writes the file and shows progress.

`verify_cache` (`dpokit cache verify`) recomputes a random sample of a cache live and reports the
largest difference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from dpokit.data.collate import collate_pairs
from dpokit.data.prepared import pair_token_counts
from dpokit.data.prepared import PreparedData, load_prepared
from dpokit.distributed import (
    destroy_distributed,
    gather_to_main,
    init_distributed,
    is_main_process,
    launch_workers,
    launched_by_torchrun,
    main_result,
    rank,
    rank_zero,
    world_size,
)
from dpokit.errors import DpokitError
from dpokit.family import resolve_attn_implementation
from dpokit.fidelity import Layout, check_layout, check_pairs
from dpokit.lock import WriterLock
from dpokit.logps import concatenated_forward
from dpokit.metrics import training_progress
from dpokit.model import check_adapter_dir, default_device, dtype_name, load_reference, resolve_dtype
from dpokit.refcache import (
    RefCache,
    RefCacheWriter,
    cache_attrs,
    check_cache_target,
    create_or_resume_cache,
    open_cache,
    reference_fingerprint,
    weights_fingerprint,
)


@dataclass
class RefLogpsOptions:
    """The arguments of `dpokit ref-logps`."""

    prepared: str
    model: str
    out: str
    gpus: int = 1
    batch_size: int = 8
    dtype: str = "auto"
    splits: Optional[list[str]] = None  # None: every split of the prepared data
    adapter: Optional[str] = None
    overwrite: bool = False
    bucket: bool = True  # sort rows by length before batching
    attn_implementation: str = "auto"  # auto: SDPA where the family supports it, else eager


@dataclass
class BatchLogps:
    """Reference outputs of one batch, on the CPU, by example index (what rank 0 gathers and writes)."""

    index: np.ndarray  # [B] example indices
    chosen_logps: np.ndarray  # [B] float32
    rejected_logps: np.ndarray
    chosen_tokens: np.ndarray  # [B] completion token counts
    rejected_tokens: np.ndarray
    num_tokens: int  # real (non-padding) tokens in the batch, chosen and rejected rows together


@dataclass
class SplitReport:
    """What a pass did on one split (a row of the closing table)."""

    split: str
    rows_total: int
    rows_computed: int = 0
    tokens: int = 0
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------
# batches

# The training default layout: each prompt computed once, no padding between sequences; the
# log-probs equal the padded layout's (tests/test_logps.py, tests/test_families.py), the work is
# smaller. A family whose attention it cannot express falls back to padded (`dpokit.fidelity`).
DEFAULT_LAYOUT = Layout(packing=True, prefix_sharing=True)


def pair_lengths(dataset) -> np.ndarray:
    """Padded width of each pair in a prepared split: prompt + the longer completion. ``[N]`` int64."""
    prompt, chosen, rejected = pair_token_counts(dataset)
    return prompt + np.maximum(chosen, rejected)


def plan_batches(rows: np.ndarray, lengths: np.ndarray, batch_size: int, bucket: bool = True) -> list[np.ndarray]:
    """Example indices `rows` cut into batches; with `bucket`, longest first so each batch is of similar lengths."""
    if batch_size < 1:
        raise DpokitError(f"--batch-size must be at least 1, got {batch_size}")
    rows = np.asarray(rows, dtype=np.int64)
    if bucket:
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
    return [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]


def pad_token_id(model: nn.Module) -> int:
    """The id used for padding (any id works: padded positions are masked out)."""
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def batch_logps(model: nn.Module, dataset, index: np.ndarray, device: torch.device, layout: Layout = DEFAULT_LAYOUT) -> BatchLogps:
    """The reference outputs for the examples `index` of a prepared split, in `layout`."""
    columns = dataset[index.tolist()]
    rows = [
        {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
        for prompt, chosen, rejected in zip(columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"])
    ]
    batch = collate_pairs(rows, index.tolist(), pad_token_id(model), layout.packing, layout.prefix_sharing).to(device)
    with torch.inference_mode():
        outputs = concatenated_forward(model, batch)
    return BatchLogps(
        index=index,
        chosen_logps=outputs.chosen_logps.float().cpu().numpy(),
        rejected_logps=outputs.rejected_logps.float().cpu().numpy(),
        chosen_tokens=outputs.chosen_tokens.cpu().numpy(),
        rejected_tokens=outputs.rejected_tokens.cpu().numpy(),
        # Tokens of both full sequences per pair, as in the padded layout, so rates stay comparable.
        num_tokens=sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows),
    )


# ----------------------------------------------------------------------------------------------
# the pass


def run_ref_logps(options: RefLogpsOptions) -> Path:
    """Build (or finish) the reference cache, launching ``options.gpus`` workers when asked."""
    check_cache_target(options.out, options.overwrite)  # before any model is loaded
    if options.gpus > 1 and not launched_by_torchrun():
        check_gpu_count(options.gpus)
        launch_workers(options.gpus, compute_reference_cache, (options,))
    else:
        compute_reference_cache(options)
    return Path(options.out)


def check_gpu_count(gpus: int) -> None:
    """On CUDA, `gpus` must not exceed the visible devices (on CPU, N gloo processes are fine)."""
    if torch.cuda.is_available() and gpus > torch.cuda.device_count():
        raise DpokitError(
            f"--gpus {gpus} but only {torch.cuda.device_count()} CUDA devices are visible; pass --gpus "
            f"{torch.cuda.device_count()} or fewer"
        )


def compute_reference_cache(options: RefLogpsOptions) -> list[SplitReport]:
    """The pass as one process runs it (every worker runs this; rank 0 writes and reports).

    Returns one `SplitReport` per split (counts are rank 0's: every row it wrote, from all ranks).
    """
    started_group = not torch.distributed.is_initialized()
    init_distributed()
    lock = WriterLock(Path(f"{options.out}.lock"), f"reference cache {options.out}")  # one writer per cache
    try:
        main_result(lambda: lock.acquire() and None)  # rank 0 holds it; a refusal stops every rank
        prepared = load_prepared(options.prepared)
        splits = requested_splits(prepared, options.splits)
        device = default_device()
        dtype = resolve_dtype(options.dtype, device)
        attn = resolve_attn_implementation(options.model, options.attn_implementation)
        pending = main_result(pending_rows_of_cache, options, prepared, splits, dtype_name(dtype), attn)
        if any(len(rows) for rows in pending.values()):
            model = load_reference(options.model, dtype, device, options.adapter, attn)
            layout = checked_layout(model, prepared.split(splits[0]))
            writer = RefCacheWriter(options.out) if is_main_process() else None
            reports = [
                compute_split(model, prepared, split, pending[split], options.batch_size, options.bucket, device, writer, layout)
                for split in splits
            ]
        else:  # a finished cache: nothing to load or compute
            reports = [SplitReport(split=split, rows_total=len(prepared.split(split))) for split in splits]
        print_report(reports, options.out)
        return reports
    finally:
        lock.release()
        if started_group:
            destroy_distributed()


def requested_splits(prepared: PreparedData, splits: Optional[Sequence[str]]) -> list[str]:
    """`splits` checked against the prepared data (default: all of its splits)."""
    if not splits:
        return prepared.splits
    unknown = [s for s in splits if s not in prepared.splits]
    if unknown:
        raise DpokitError(
            f"{prepared.path}: no split {', '.join(map(repr, unknown))}; it has {', '.join(prepared.splits)} (--splits)"
        )
    return list(splits)


def checked_layout(model: nn.Module, dataset) -> Layout:
    """The default layout, or padded where the family needs it; refuses a family dpokit cannot reproduce."""
    return check_layout(model, check_pairs(dataset), pad_token_id(model), DEFAULT_LAYOUT, announce=announce)


@rank_zero
def announce(message: str) -> None:
    Console(stderr=True).print(f"[yellow]note:[/] {message}", soft_wrap=True)


def pending_rows_of_cache(
    options: RefLogpsOptions, prepared: PreparedData, splits: list[str], dtype: str, attn_implementation: str
) -> dict[str, np.ndarray]:
    """Create the cache (or check the existing one was made from the same inputs); its rows still to compute.

    The file holds every split of the prepared data from the start, so a later run with other
    ``--splits`` fills the rest without changing the file's structure.
    """
    if options.adapter:
        check_adapter_dir(options.adapter)
    attrs = cache_attrs(
        model=model_identity(options.model),
        weights=weights_fingerprint(options.model),
        adapter=model_identity(options.adapter) if options.adapter else None,
        adapter_weights=weights_fingerprint(options.adapter) if options.adapter else None,
        prepared_path=str(prepared.path.resolve()),
        data_fingerprint=prepared.fingerprint,
        tokenizer_fingerprint=prepared.tokenizer_fingerprint,
        dtype=dtype,
        attn_implementation=attn_implementation,
    )
    rows = {split: len(prepared.split(split)) for split in prepared.splits}
    cache = create_or_resume_cache(options.out, attrs, rows, options.overwrite)
    return {split: cache.pending_rows(split) for split in splits}


def model_identity(model: str) -> str:
    """A model's name as recorded in the cache: an absolute path for a local directory, else the hub name."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def compute_split(
    model: nn.Module,
    prepared: PreparedData,
    split: str,
    pending: np.ndarray,
    batch_size: int,
    bucket: bool,
    device: torch.device,
    writer: Optional[RefCacheWriter],
    layout: Layout = DEFAULT_LAYOUT,
) -> SplitReport:
    """Compute and (on rank 0) write the `pending` rows of one split; every rank calls this."""
    dataset = prepared.split(split)
    report = SplitReport(split=split, rows_total=len(dataset))
    batches = plan_batches(pending, pair_lengths(dataset), batch_size, bucket)
    my_batches = batches[rank() :: world_size()]
    steps = math.ceil(len(batches) / world_size())
    start = time.perf_counter()
    with training_progress(console=Console(stderr=True), enabled=is_main_process()) as progress:
        task = progress.add_task(f"ref-logps {split}", total=len(pending), rate="", status="")
        for step in range(steps):
            # Every rank joins every gather, with None once its own batches have run out.
            result = batch_logps(model, dataset, my_batches[step], device, layout) if step < len(my_batches) else None
            gathered = gather_to_main(result)
            if writer is None:
                continue
            for batch in filter(None, gathered):
                writer.write(
                    split, batch.index, batch.chosen_logps, batch.rejected_logps, batch.chosen_tokens, batch.rejected_tokens
                )
                report.rows_computed += len(batch.index)
                report.tokens += batch.num_tokens
            report.seconds = time.perf_counter() - start
            progress.update(task, completed=report.rows_computed, rate=rate_text(report))
    report.seconds = time.perf_counter() - start
    return report


def rate_text(report: SplitReport) -> str:
    """``examples/s · tokens/s`` so far."""
    seconds = max(report.seconds, 1e-9)
    return f"{report.rows_computed / seconds:,.1f} ex/s · {report.tokens / seconds:,.0f} tok/s"


@rank_zero
def print_report(reports: Sequence[SplitReport], out: str) -> None:
    Console().print(report_table(reports, out))


def report_table(reports: Sequence[SplitReport], out: str) -> Table:
    """The closing table: per split, rows computed, tokens, time and rates."""
    table = Table(title=f"reference log-probs → {out}")
    for column in ("split", "rows", "tokens", "seconds", "examples/s", "tokens/s"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for r in reports:
        seconds = max(r.seconds, 1e-9)
        table.add_row(
            r.split,
            f"{r.rows_computed:,} new / {r.rows_total:,}",
            f"{r.tokens:,}",
            f"{r.seconds:.1f}",
            f"{r.rows_computed / seconds:,.1f}",
            f"{r.tokens / seconds:,.0f}",
        )
    return table


# ----------------------------------------------------------------------------------------------
# verify


@dataclass
class VerifyReport:
    """The outcome of `verify_cache`: the largest absolute difference and where it is."""

    rows_checked: int = 0
    max_difference: float = 0.0
    worst: str = ""  # "split row i (chosen)"
    token_mismatches: list[str] = field(default_factory=list)
    per_split: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # rows, max |Δ| chosen, rejected


def verify_cache(
    cache_path: str,
    prepared_path: str,
    model: str,
    adapter: Optional[str] = None,
    sample: int = 32,
    tolerance: float = 1e-4,
    batch_size: int = 8,
    seed: int = 0,
) -> VerifyReport:
    """Recompute `sample` random written rows of a cache live and compare; raise above `tolerance`.

    The model runs in the dtype the cache was made with. Raises `DpokitError` if the cache was built
    from other inputs, if the largest absolute log-prob difference exceeds `tolerance`, or if a
    token count differs.
    """
    cache = open_cache(cache_path)
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
    attn = cache.attr("attn_implementation")
    reference = load_reference(model, resolve_dtype(cache.attrs["dtype"], device), device, adapter, attn)
    layout = checked_layout(reference, prepared.split(next(iter(chosen_rows))))
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
    model: nn.Module, dataset, cache: RefCache, split: str, rows: np.ndarray, batch_size: int, device: torch.device,
    report: VerifyReport, layout: Layout = DEFAULT_LAYOUT,
) -> None:
    """Recompute `rows` of `split` and fold the differences from the cache into `report`."""
    cached = cache.logps(split, require_done=False)
    side_max = {"chosen": 0.0, "rejected": 0.0}
    for index in plan_batches(rows, pair_lengths(dataset), batch_size):
        live = batch_logps(model, dataset, index, device, layout)
        for side in side_max:
            differences = np.abs(getattr(cached, f"{side}_logps")[index].numpy() - getattr(live, f"{side}_logps"))
            side_max[side] = max(side_max[side], float(differences.max()))
            worst = int(np.argmax(differences))
            if differences[worst] > report.max_difference:
                report.max_difference = float(differences[worst])
                report.worst = f"{split} row {int(index[worst])} ({side})"
            mismatched = index[getattr(cached, f"{side}_tokens")[index].numpy() != getattr(live, f"{side}_tokens")]
            report.token_mismatches += [f"{split} row {int(i)} ({side})" for i in mismatched]
    report.rows_checked += len(rows)
    report.per_split[split] = (len(rows), side_max["chosen"], side_max["rejected"])


def verify_table(report: VerifyReport, cache_path: str, tolerance: float) -> Table:
    """Per split: rows recomputed and the largest differences; the caption says pass or fail."""
    passed = report.max_difference <= tolerance and not report.token_mismatches
    table = Table(
        title=f"cache verify {cache_path}",
        caption=f"largest |Δ| {report.max_difference:.3g} (tolerance {tolerance:g}): {'ok' if passed else 'FAILED'}",
    )
    for column in ("split", "rows checked", "max |Δ| chosen", "max |Δ| rejected"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, (rows, chosen, rejected) in report.per_split.items():
        table.add_row(split, str(rows), f"{chosen:.3g}", f"{rejected:.3g}")
    return table


__all__ = [
    "BatchLogps",
    "RefLogpsOptions",
    "batch_logps",
    "compute_reference_cache",
    "pair_lengths",
    "plan_batches",
    "run_ref_logps",
    "verify_cache",
]
