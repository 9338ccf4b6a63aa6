"""The reference pass (`dpokit ref-logps`): run the frozen reference once over prepared data into ``ref.h5``.

For each split, the rows not yet done are sorted by length (longest first, so an out-of-memory
batch shows up at the start, not hours in) and cut into batches, so a batch holds rows of similar
length and little padding. Each batch goes through `dpokit.logps.concatenated_forward` under
``torch.inference_mode()``. Results are written by example index, so neither the order nor the
batch size changes the file. Ranked data (k completions per prompt) runs the same way, a group's prompt once
with its k completions behind it, and writes one cache row per completion.

With N processes, the batches are dealt round-robin to the ranks; after each step every rank's
results are gathered to rank 0, which alone writes the file (the step's rows in one commit) and
shows progress.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from rich.table import Table
from torch import nn

from dpokit import log
from dpokit.config import DistributedConfig
from dpokit.data.collate import collate_pairs, example_completions
from dpokit.data.loader import example_rows
from dpokit.data.prepared import PreparedData, group_token_counts, load_prepared, pair_lengths, pair_token_counts
from dpokit.distributed import (
    DistInfo,
    apply_fsdp,
    cpu_threads,
    destroy_distributed,
    gather_to_main,
    init_distributed,
    init_fsdp_root,
    launch_workers,
    launched_by_torchrun,
    main_result,
)
from dpokit.errors import DpokitError
from dpokit.family import resolve_attn_implementation
from dpokit.fidelity import Layout, check_layout, check_pairs
from dpokit.fingerprint import weights_fingerprint
from dpokit.lock import WriterLock, lock_path
from dpokit.logps import concatenated_forward
from dpokit.metrics import training_progress
from dpokit.model import (
    block_bitsandbytes_import,
    check_adapter_dir,
    default_device,
    dtype_name,
    load_reference,
    load_reference_sharded,
    pad_token_id,
    resolve_dtype,
)
from dpokit.reference.cache import RefCacheWriter, cache_attrs, check_cache_target, create_or_resume_cache
from dpokit.types import PairBatch


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
    per_token: bool = False  # also store each completion token's log-prob (token-level losses)
    threads: Optional[int] = None  # CPU torch threads per process; None: the cores, shared among the workers
    shard_model: bool = False  # with several processes: FSDP2-shard the reference (a model bigger than one device)


@dataclass
class BatchLogps:
    """Reference outputs of one batch, on the CPU, by example index (what rank 0 gathers and writes)."""

    index: np.ndarray  # [B] example indices
    chosen_logps: np.ndarray  # [B] float32
    rejected_logps: np.ndarray
    chosen_tokens: np.ndarray  # [B] completion token counts
    rejected_tokens: np.ndarray
    num_tokens: int  # real (non-padding) tokens in the batch, chosen and rejected rows together
    token_logps: Optional[list[np.ndarray]] = None  # per row: chosen then rejected tokens' log-probs


@dataclass
class GroupLogps:
    """Reference outputs of one batch of ranked groups, on the CPU: per completion, group by group in `index` order."""

    index: np.ndarray  # [G] example indices
    logps: np.ndarray  # [C] float32
    tokens: np.ndarray  # [C] completion token counts
    num_tokens: int  # real tokens as the padded layout would compute them (prompt + completion per completion)
    token_logps: Optional[list[np.ndarray]] = None  # per completion: its tokens' log-probs


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


def plan_batches(rows: np.ndarray, lengths: np.ndarray, batch_size: int, bucket: bool = True) -> list[np.ndarray]:
    """Example indices `rows` cut into batches; with `bucket`, longest first so each batch is of similar lengths."""
    if batch_size < 1:
        raise DpokitError(f"--batch-size must be at least 1, got {batch_size}")
    rows = np.asarray(rows, dtype=np.int64)
    if bucket:
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
    return [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]


def batch_logps(
    model: nn.Module,
    dataset,
    index: np.ndarray,
    device: torch.device,
    layout: Layout = DEFAULT_LAYOUT,
    per_token: bool = False,
    sharded: bool = False,
) -> BatchLogps:
    """The reference outputs for the examples `index` of a prepared split, in `layout` (a `sharded` model under
    ``no_grad``: FSDP2's gathers write into its parameters, which inference mode forbids)."""
    return forward_logps(model, collated_batch(dataset, index, pad_token_id(model), layout, device), device, per_token,
                         sharded)  # fmt: skip


class CollatedBatch(NamedTuple):
    """A batch read and collated on the host, ready for the device (what the loop prepares ahead)."""

    index: np.ndarray
    batch: PairBatch
    num_tokens: int  # every full sequence (prompt + completion), as in the padded layout, so rates stay comparable


def collated_batch(dataset, index: np.ndarray, pad_id: int, layout: Layout, device: torch.device) -> CollatedBatch:
    """Read examples `index` of a prepared split (pairs or ranked groups) and collate them in `layout` (pinned for
    a CUDA copy)."""
    return collated_rows(example_rows(dataset, index.tolist()), index, pad_id, layout, device)


def collated_rows(
    rows: list[dict], index: np.ndarray, pad_id: int, layout: Layout, device: torch.device
) -> CollatedBatch:
    """Rows as `example_rows` reads them (pairs, or ranked groups: ``prompt_ids``, ``completion_ids``, ``scores``),
    examples `index`, collated in `layout` (pinned for a CUDA copy): a batch `forward_logps` runs."""
    batch = collate_pairs(rows, index.tolist(), pad_id, layout.packing, layout.prefix_sharing)
    if device.type == "cuda":
        batch = batch.pin_memory()
    prompts, completions, _ = example_completions(rows)
    tokens = sum(len(prompt) * len(group) + sum(map(len, group)) for prompt, group in zip(prompts, completions))
    return CollatedBatch(index, batch, tokens)


def forward_logps(
    model: nn.Module, collated: CollatedBatch, device: torch.device, per_token: bool = False, sharded: bool = False
) -> BatchLogps | GroupLogps:
    """The reference forward on a collated batch, its values read back in one device-to-host copy."""
    batch = collated.batch.to(device)
    with torch.no_grad() if sharded else torch.inference_mode():
        outputs = concatenated_forward(model, batch)
        if batch.is_grouped:
            sums = torch.stack([outputs.logps.double(), outputs.tokens.double()]).cpu().numpy()
            token_logps = None
            if per_token:
                values, mask = outputs.token_logps.float().cpu().numpy(), outputs.token_mask.cpu().numpy()
                token_logps = [values[c][mask[c]] for c in range(len(values))]
            return GroupLogps(
                index=collated.index,
                logps=sums[0].astype(np.float32),
                tokens=sums[1].astype(np.int64),
                num_tokens=collated.num_tokens,
                token_logps=token_logps,
            )
        sums = torch.stack(
            [outputs.chosen_logps.double(), outputs.rejected_logps.double(),
             outputs.chosen_tokens.double(), outputs.rejected_tokens.double()]
        ).cpu().numpy()  # fmt: skip
    return BatchLogps(
        index=collated.index,
        chosen_logps=sums[0].astype(np.float32),
        rejected_logps=sums[1].astype(np.float32),
        chosen_tokens=sums[2].astype(np.int64),
        rejected_tokens=sums[3].astype(np.int64),
        num_tokens=collated.num_tokens,
        token_logps=row_token_logps(outputs) if per_token else None,
    )


def concatenated(batches: Sequence[BatchLogps | GroupLogps]) -> BatchLogps | GroupLogps:
    """Several batches' outputs as one (rank 0 writes a step's batches from every rank together)."""
    if len(batches) == 1:
        return batches[0]
    kind = type(batches[0])
    names = ("index", "logps", "tokens") if kind is GroupLogps else (
        "index", "chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")  # fmt: skip
    arrays = {name: np.concatenate([getattr(batch, name) for batch in batches]) for name in names}
    token_logps = None if batches[0].token_logps is None else [row for batch in batches for row in batch.token_logps]
    return kind(**arrays, num_tokens=sum(batch.num_tokens for batch in batches), token_logps=token_logps)


def row_token_logps(outputs) -> list[np.ndarray]:
    """Each pair's chosen then rejected per-token log-probs, as the cache stores them."""
    chosen = outputs.chosen_token_logps.float().cpu().numpy()
    rejected = outputs.rejected_token_logps.float().cpu().numpy()
    chosen_mask = outputs.chosen_token_mask.cpu().numpy()
    rejected_mask = outputs.rejected_token_mask.cpu().numpy()
    return [np.concatenate([chosen[i][chosen_mask[i]], rejected[i][rejected_mask[i]]]) for i in range(len(chosen))]


# ----------------------------------------------------------------------------------------------
# the pass


def run_ref_logps(options: RefLogpsOptions) -> Path:
    """Build (or finish) the reference cache, launching ``options.gpus`` workers when asked."""
    if options.batch_size < 1:  # before anything is written
        raise DpokitError(f"--batch-size must be at least 1, got {options.batch_size}")
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
    with cpu_threads(options.threads if not torch.cuda.is_available() else None):
        return _compute_reference_cache(options)


def _compute_reference_cache(options: RefLogpsOptions) -> list[SplitReport]:
    started_group = not torch.distributed.is_initialized()
    info = init_distributed()
    if info.world_size > 1:  # a worker process runs only this pass, which loads no 4-bit weights
        block_bitsandbytes_import()
    lock = WriterLock(lock_path(Path(options.out)), f"reference cache {options.out}")  # one writer per cache
    try:
        main_result(lambda: lock.acquire() and None)  # rank 0 holds it; a refusal stops every rank
        prepared = load_prepared(options.prepared)
        splits = requested_splits(prepared, options.splits)
        device = default_device()
        dtype = resolve_dtype(options.dtype, device)
        attn = resolve_attn_implementation(options.model, options.attn_implementation)
        pending = main_result(pending_rows_of_cache, options, prepared, splits, dtype_name(dtype), attn)
        if any(len(rows) for rows in pending.values()):
            sharded = options.shard_model and info.world_size > 1
            if sharded:  # every rank holds 1/N of the weights; each forward gathers layer by layer
                shard = lambda model: apply_fsdp(model, DistributedConfig(), device, dtype)  # noqa: E731
                model = load_reference_sharded(options.model, dtype, device, shard, options.adapter, attn)
                init_fsdp_root(model)
                if log.enabled("debug"):
                    held = sum(p.to_local().numel() for p in model.parameters())
                    total = sum(p.numel() for p in model.parameters())
                    log.debug(
                        f"rank {info.rank}: the reference is sharded over {info.world_size} processes, "
                        f"{held:,} of its {total:,} weights here"
                    )
            else:
                model = load_reference(options.model, dtype, device, options.adapter, attn)
            layout = checked_layout(model, prepared.split(splits[0]), announce if info.is_main else None)
            writer = RefCacheWriter(options.out) if info.is_main else None
            if writer is not None:
                writer.record_checked_layout(layout.name)
            reports = [
                compute_split(
                    model,
                    prepared,
                    split,
                    pending[split],
                    options.batch_size,
                    options.bucket,
                    device,
                    writer,
                    layout,
                    info,
                    options.per_token,
                    sharded,
                )
                for split in splits
            ]
        else:  # a finished cache: nothing to load or compute
            reports = [SplitReport(split=split, rows_total=len(prepared.split(split))) for split in splits]
        if info.is_main:
            log.console().print(report_table(reports, options.out))
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


def checked_layout(model: nn.Module, dataset, announce: Optional[Callable[[str], None]]) -> Layout:
    """The default layout, or padded where the family needs it; refuses a family dpokit cannot reproduce."""
    return checked_layout_of_rows(model, check_pairs(dataset), announce)


def checked_layout_of_rows(model: nn.Module, rows: list[dict], announce: Optional[Callable[[str], None]]) -> Layout:
    """`checked_layout` on `rows` (pairs or ranked groups, as `check_pairs` picks them) instead of a split's."""
    return check_layout(model, rows, pad_token_id(model), DEFAULT_LAYOUT, announce=announce)


announce = log.note


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
        per_token=options.per_token,
        shape="ranked" if prepared.is_grouped else "pairs",  # unpaired data: groups of [completion, KL completion]
    )
    rows = {split: len(prepared.split(split)) for split in prepared.splits}
    token_counts, group_sizes = None, None
    if prepared.is_grouped:  # a cache row per completion
        counts = {split: group_token_counts(prepared.split(split)) for split in prepared.splits}
        group_sizes = {split: sizes for split, (_, _, sizes) in counts.items()}
        if options.per_token:
            token_counts = {split: tokens for split, (_, tokens, _) in counts.items()}
    elif options.per_token:
        token_counts = {split: sum(pair_token_counts(prepared.split(split))[1:]) for split in prepared.splits}
    cache = create_or_resume_cache(options.out, attrs, rows, options.overwrite, token_counts, group_sizes)
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
    info: DistInfo = DistInfo(),
    per_token: bool = False,
    sharded: bool = False,
) -> SplitReport:
    """Compute and (on rank 0) write the `pending` rows of one split; every rank calls this. A `sharded` model's
    forward is collective: a rank whose batches have run out repeats one and discards it.

    Three things overlap: a thread reads and collates the next batch while the model runs this one, and rank 0
    writes a step's rows in another thread while the next step computes (HDF5 is only touched there; a failed
    write stops the pass at the next step, and every written step is a whole commit, so a resume is exact).
    """
    dataset = prepared.split(split)
    report = SplitReport(split=split, rows_total=len(dataset))
    batches = plan_batches(pending, pair_lengths(dataset), batch_size, bucket)
    my_batches = batches[info.rank :: info.world_size]
    steps = math.ceil(len(batches) / info.world_size)
    start = time.perf_counter()
    pad_id = pad_token_id(model)
    # What this rank runs at each step: its own batch, or (sharded, batches run out) a repeat to discard.
    plan = [my_batches[step] if step < len(my_batches) else None for step in range(steps)]
    inputs = [index if index is not None or not sharded else (my_batches or batches)[0] for index in plan]
    with (
        training_progress(console=log.console(stderr=True), enabled=info.is_main) as progress,
        ThreadPoolExecutor(1, thread_name_prefix="ref-collate") as collating,
        ThreadPoolExecutor(1, thread_name_prefix="ref-write") as writing,
    ):
        task = progress.add_task(f"ref-logps {split}", total=len(pending), rate="", status="")

        def collate(step: int):
            index = inputs[step] if step < steps else None
            return None if index is None else collating.submit(collated_batch, dataset, index, pad_id, layout, device)

        def write(rows: BatchLogps | GroupLogps) -> None:
            if isinstance(rows, GroupLogps):
                writer.write_groups(split, rows.index, rows.logps, rows.tokens, rows.token_logps)
                return
            writer.write(split, rows.index, rows.chosen_logps, rows.rejected_logps, rows.chosen_tokens,
                         rows.rejected_tokens, rows.token_logps)  # fmt: skip

        upcoming, written = collate(0), None
        for step in range(steps):
            collated, upcoming = upcoming, collate(step + 1)  # the next batch is read while this one runs
            result = forward_logps(model, collated.result(), device, per_token, sharded) if collated else None
            # Every rank joins every gather, with None once its own batches have run out.
            gathered = gather_to_main(result if plan[step] is not None else None)
            if writer is None:
                continue
            batches = [batch for batch in gathered if batch is not None]
            if batches:  # every rank's rows of this step in one commit: a commit costs per call, not per row
                step_rows = concatenated(batches)
                if written is not None:
                    written.result()  # the previous step's commit is done (or its error raised) before this one
                written = writing.submit(write, step_rows)
                report.rows_computed += len(step_rows.index)
                report.tokens += step_rows.num_tokens
            report.seconds = time.perf_counter() - start
            progress.update(task, completed=report.rows_computed, rate=rate_text(report))
        if written is not None:
            written.result()
    report.seconds = time.perf_counter() - start
    return report


def rate_text(report: SplitReport) -> str:
    """``examples/s · tokens/s`` so far."""
    seconds = max(report.seconds, 1e-9)
    return f"{report.rows_computed / seconds:,.1f} ex/s · {report.tokens / seconds:,.0f} tok/s"


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
