"""`dpokit sample`: k completions per prompt from a model, seeded, sharded over processes and resumable.

    dpokit sample prompts.jsonl --model MODEL --k 8 --out samples/

What it does, top to bottom:

1. read the prompts (`read_prompts`): a ``.txt`` file (a prompt a line), rows with a ``prompt`` column (text or
   messages) from any source `dpokit prepare` reads, or the prompts of preference rows (pairs, ranked, unpaired;
   an implicit pair's shared turns). Empty, malformed, repeated and (``--max-prompt-length``) over-long prompts
   are skipped and counted by reason, never silently;
2. make each prompt's ids as `dpokit prepare` makes a prompt's (`PairTokenizer.prompt_ids`: the chat template
   with its generation prompt, or the plain text and the separator), so a completion written behind them later is
   prepared data;
3. cut the prompts into batches in source order (batch b: prompts ``[b*B, (b+1)*B)``); process r of N takes the
   batches b with ``b % N == r``, and every batch is sampled after seeding from (seed, b) alone
   (`batch_seed`), so the samples are the same on 1 or N processes and after a resume;
4. sample each batch with `model.generate` (left padding, KV cache, ``num_return_sequences=k``; only the flags'
   temperature and top-p: the checkpoint's own generation settings are not used) and write it to
   ``batches/batch_NNNNNN.jsonl`` through a temporary file renamed into place, so a batch file is whole or absent;
5. once every batch is there, rank 0 joins them into ``samples.jsonl`` and marks the manifest complete.

With ``--ref-logps`` (the sampler is the reference), step 4 also runs a teacher-forced forward over each batch's
completions, as `dpokit ref-logps` would, and stores each completion's summed log-prob and token count in its
record (``ref_logps``, ``ref_tokens``; `dpokit.onpolicy.sampled_reference`), so `dpokit select` can write the
reference cache of the data it selects without a ref-logps pass.

A completion's ids end at, and include, its first stop token (`dpokit.model.stop_token_ids`); one that reaches
``--max-new-tokens`` first is kept and marked ``finished: false``. Running the same command again on an
unfinished folder samples only the missing batches; another setting is refused, naming it, unless
``--overwrite``. docs/on-policy.md describes the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from dpokit import __version__, log
from dpokit.artifacts import (
    check_replaceable,
    is_dpokit_artifact,
    not_own_reason,
    read_marker,
    remove_within,
    replace_within,
    write_marker,
    write_text_within,
)
from dpokit.data.formats import (
    ALL_COLUMN_MAP_TARGETS,
    COLUMN_MAP_TARGETS,
    Record,
    SkippedRow,
    detect_format,
    detect_shape,
    implicit_messages,
    mapped_row,
    missing_column_message,
    not_utf8_error,
    open_records,
    parse_column_map,
    prompt_messages,
    ranked_column,
    ranked_prompt,
    with_system_prompt,
)
from dpokit.data.tokenize import PLAIN_TURN_SEPARATOR, LengthLimits, PairTokenizer, load_tokenizer
from dpokit.errors import DpokitError
from dpokit.onpolicy.sampled_reference import REF_KEYS, group_logps, group_rows, manifest_entry, sampler_layout

FORMAT_VERSION = 1
KIND = "samples"
MANIFEST_FILE = "manifest.json"
SAMPLES_FILE = "samples.jsonl"
BATCHES_DIR = "batches"
LOCK_NAME = ".dpokit.lock"
TOKENIZE_CHUNK = 256  # prompts per tokenizer call

# The settings a resume must share with the folder, in the order a difference is reported, with the flag that
# sets each (the derived ones, after them, say what changed in words).
SETTING_FLAGS = {
    "format_version": "the samples format (a dpokit upgrade)",
    "model": "--model",
    "adapter": "--adapter",
    "k": "--k",
    "seed": "--seed",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "max_new_tokens": "--max-new-tokens",
    "batch_size": "--batch-size",
    "prompts": "PROMPTS",
    "split": "--split",
    "subset": "--subset",
    "column_map": "--column-map",
    "system_prompt": "--system-prompt",
    "chat_template": "--chat-template",
    "max_prompt_length": "--max-prompt-length",
    "ref_logps": "--ref-logps",
    "dtype": "--dtype (or the device: bf16 on CUDA, fp32 on CPU)",
    "tokenizer": "the tokenizer (its files, or the --chat-template file's content)",
    "weights": "the model's weights",
    "adapter_weights": "the adapter's weights",
    "prompts_fingerprint": "the prompts' token ids (the PROMPTS source's content)",
}


@dataclass
class SampleOptions:
    """The arguments of `dpokit sample`."""

    prompts: str
    model: str
    out: str
    k: int = 8
    adapter: Optional[str] = None
    temperature: float = 1.0  # 0: greedy (the k completions are then the same)
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 8  # prompts per generate call (per process); k completions each
    seed: int = 0
    gpus: int = 1
    dtype: str = "auto"
    chat_template: Optional[str] = None
    system_prompt: Optional[str] = None
    split: Optional[str] = None  # None: a dataset's or a split-named folder's train split, a plain file whole
    subset: Optional[str] = None
    column_map: Optional[str] = None
    max_prompt_length: Optional[int] = None  # prompts with more ids are skipped (counted)
    ref_logps: bool = False  # also each completion's log-prob under the sampler (it is the reference), for select
    overwrite: bool = False


@dataclass
class PromptSet:
    """The prompts to sample from, in source order, and those skipped, by reason."""

    source: str
    messages: list[list[dict[str, str]]] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    first_skipped: dict[str, str] = field(default_factory=dict)  # reason -> "location: detail" of its first

    def skip(self, reason: str, location: str, detail: str) -> None:
        self.skipped[reason] += 1
        self.first_skipped.setdefault(reason, f"{location}: {detail}")


@dataclass
class SamplePlan:
    """What rank 0 decided and every rank follows: the prompts, the manifest and the batches still to sample."""

    manifest: dict
    prompt_messages: list[list[dict[str, str]]]
    prompt_ids: list[list[int]]
    pending: list[int]  # batch numbers whose file is absent


@dataclass
class SampleReport:
    """What a run did (rank 0's: every process's batches)."""

    out: Path
    prompts: int
    completions: int
    unfinished: int
    skipped: dict[str, int]
    new_completions: int = 0
    seconds: float = 0.0
    already_complete: bool = False


# ----------------------------------------------------------------------------------------------
# prompts


def read_prompts(
    source: str,
    tokenizer,
    split: Optional[str] = None,
    subset: Optional[str] = None,
    column_map: Optional[str] = None,
    system_prompt: Optional[str] = None,
    max_prompt_length: Optional[int] = None,
) -> PromptSet:
    """The prompts of `source` as messages and ids (as `dpokit prepare` makes a prompt's), skipped ones counted.

    A ``.txt`` file holds one prompt a line; any other source is what `formats.open_records` reads, each row's
    prompt taken by `record_prompt`. A prompt repeated exactly (same messages) is sampled once.
    """
    prompts = PromptSet(source=source)
    mapping = parse_column_map(column_map, ALL_COLUMN_MAP_TARGETS)
    seen: set[str] = set()
    kept: list[tuple[str, list[dict[str, str]]]] = []
    for location, messages, skipped in source_prompts(source, split, subset, mapping):
        if skipped is not None:
            prompts.skip(skipped.reason, location, skipped.detail)
            continue
        if system_prompt is not None:
            messages = with_system_prompt(messages, system_prompt)
        key = json.dumps(messages, sort_keys=True)
        if key in seen:
            prompts.skip("duplicate", location, "the same prompt as an earlier row")
            continue
        seen.add(key)
        kept.append((location, messages))
    as_prepared = PairTokenizer(tokenizer, LengthLimits(), PLAIN_TURN_SEPARATOR)
    for start in range(0, len(kept), TOKENIZE_CHUNK):
        chunk = kept[start : start + TOKENIZE_CHUNK]
        for (location, messages), ids in zip(chunk, tokenized_prompts(as_prepared, [m for _, m in chunk])):
            if isinstance(ids, SkippedRow):
                prompts.skip(ids.reason, location, ids.detail)
            elif max_prompt_length is not None and len(ids) > max_prompt_length:
                prompts.skip(
                    "prompt_too_long", location, f"{len(ids)} tokens, over --max-prompt-length {max_prompt_length}"
                )
            else:
                prompts.messages.append(messages)
                prompts.ids.append(ids)
    return prompts


def tokenized_prompts(as_prepared: PairTokenizer, prompts: list[list[dict]]) -> list[list[int] | SkippedRow]:
    """Each prompt's ids (`PairTokenizer.prompt_ids`), or a `SkippedRow` for one its chat template refuses (a
    template's ``raise_exception``, e.g. roles that do not alternate), as `dpokit prepare` skips such a row."""
    try:
        return as_prepared.prompt_ids(prompts)
    except Exception:  # jinja errors and the template's own raise_exception: find the prompts at fault
        results = []
        for prompt in prompts:
            try:
                results.append(as_prepared.prompt_ids([prompt])[0])
            except Exception as exc:
                results.append(SkippedRow("template_error", str(exc)))
        return results


def source_prompts(
    source: str, split: Optional[str], subset: Optional[str], column_map: dict[str, str]
) -> Iterator[tuple[str, Optional[list[dict[str, str]]], Optional[SkippedRow]]]:
    """(location, messages, None) for each prompt of `source`, or (location, None, reason) for an unusable one."""
    path = Path(source)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DpokitError(f"prompts file {source} does not exist")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # as `formats.load_prompts` reads one
        except UnicodeDecodeError as exc:
            raise not_utf8_error(path) from exc
        for number, text in enumerate(lines, start=1):
            if text.strip():
                yield f"{path} line {number}", [{"role": "user", "content": text}], None
            else:
                yield f"{path} line {number}", None, SkippedRow("empty_content", "the line is empty")
        return
    records = open_records(source, split, subset)
    shape = None
    for record in records:
        if shape is None:
            shape = prompt_shape(record.row, column_map)
            check_prompt_column_map(column_map, shape)
        try:
            yield record.location, record_prompt(record, shape, column_map), None
        except SkippedRow as skipped:
            yield record.location, None, skipped


def prompt_shape(row: dict[str, Any], column_map: dict[str, str]) -> str:
    """``prompts`` for a row that holds a prompt and no preference (no chosen, completions or label), else the
    preference shape `formats.detect_shape` gives (pairs, ranked or unpaired), whose prompts are taken."""
    shape = detect_shape(row, column_map)
    if shape == "pairs" and "chosen" not in row and not {"chosen", "rejected"} & set(column_map):
        return "prompts"
    return shape


def check_prompt_column_map(column_map: dict[str, str], shape: str) -> None:
    """Refuse --column-map targets the data's shape does not have (``chosen`` for a prompts file)."""
    targets = ("prompt",) if shape == "prompts" else COLUMN_MAP_TARGETS[shape]
    other = [target for target in column_map if target not in targets]
    if other:
        raise DpokitError(
            f"--column-map target {other[0]!r} does not apply: the data is {shape} (its targets: {', '.join(targets)})"
        )


def record_prompt(record: Record, shape: str, column_map: dict[str, str]) -> list[dict[str, str]]:
    """The prompt of one row of `shape`, as messages, taken as `dpokit prepare` takes it: a ``prompt`` (text or
    messages), an implicit pair's shared leading turns, a ranked row's prompt (UltraFeedback's ``instruction``,
    Nectar's Human/Assistant text). Raises `SkippedRow` for an unusable one, `DpokitError` for a missing column."""
    row = record.row
    if shape == "pairs":
        values = mapped_row(record, column_map)
        if detect_format(values) == "implicit":
            return implicit_messages(values["chosen"], values["rejected"])[0]
        return prompt_messages(values["prompt"])
    if shape == "ranked":
        prompt_column = ranked_column(record, "prompt", column_map, fallback="instruction")
        completions_column = ranked_column(record, "completions", column_map, fallback="answers")
        nectar = completions_column != column_map.get("completions", "completions")
        return ranked_prompt(row[prompt_column], nectar)
    column = column_map.get("prompt", "prompt")  # prompts and unpaired rows
    if column not in row:
        raise DpokitError(missing_column_message(record, "prompt", column_map))
    return prompt_messages(row[column])


def prompts_fingerprint(ids: list[list[int]]) -> str:
    """SHA-256 of the prompts' ids in order: a resume must sample the same prompts."""
    digest = hashlib.sha256()
    for prompt in ids:
        digest.update(json.dumps(prompt).encode() + b"\n")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# the run


def run_sample(options: SampleOptions) -> SampleReport:
    """Sample (or finish sampling) ``options.out``, launching ``options.gpus`` workers when asked; rank 0's report."""
    from dpokit.distributed import launch_workers, launched_by_torchrun
    from dpokit.reference.compute import check_gpu_count

    check_options(options)
    check_samples_target(options)  # before any model is loaded
    if options.gpus > 1 and not launched_by_torchrun():
        check_gpu_count(options.gpus)
        return launch_workers(options.gpus, sample_into_folder, (options,))[0]
    return sample_into_folder(options)


def check_options(options: SampleOptions) -> None:
    """Refuse option values that cannot sample, naming the flag."""
    checks = (
        ("--k", options.k, options.k >= 1, "at least 1"),
        ("--batch-size", options.batch_size, options.batch_size >= 1, "at least 1"),
        ("--max-new-tokens", options.max_new_tokens, options.max_new_tokens >= 1, "at least 1"),
        ("--temperature", options.temperature, options.temperature >= 0, "at least 0 (0: greedy)"),
        ("--top-p", options.top_p, 0 < options.top_p <= 1, "above 0 and at most 1"),
        ("--max-prompt-length", options.max_prompt_length,
         options.max_prompt_length is None or options.max_prompt_length >= 1, "at least 1 (leave it out for no limit)"),
    )  # fmt: skip
    for flag, value, ok, rule in checks:
        if not ok:
            raise DpokitError(f"{flag} must be {rule}, got {value}")


def check_samples_target(options: SampleOptions) -> None:
    """``--out`` may be written: absent, empty, or a `dpokit sample` folder (resumed, or with --overwrite started
    over) that holds none of the inputs. Anything else is refused."""
    inputs = (options.prompts, options.model, options.adapter, options.chat_template)
    check_replaceable(options.out, KIND, overwrite=True, inputs=inputs)


def sample_into_folder(options: SampleOptions) -> Optional[SampleReport]:
    """The run as one process does it (every worker runs this; rank 0 prepares the folder, joins the batches and
    reports). Returns the report on rank 0, None on the others."""
    import torch

    from dpokit.distributed import destroy_distributed, init_distributed, main_result
    from dpokit.lock import WriterLock, lock_path
    from dpokit.model import block_bitsandbytes_import

    started_group = not torch.distributed.is_initialized()
    info = init_distributed()
    if info.world_size > 1:  # a worker runs only this, which loads no 4-bit weights
        block_bitsandbytes_import()
    out = Path(options.out)
    lock = WriterLock(lock_path(out, LOCK_NAME), f"samples folder {out}")
    try:
        plan = main_result(open_samples_folder, options, lock)
        mine = [batch for batch in plan.pending if batch % info.world_size == info.rank]
        reference = plan.manifest.get("ref_logps")  # with --ref-logps: ref-logps's attention implementation
        attn = reference["attn_implementation"] if reference else "auto"
        model, tokenizer = load_sampler(options, attn) if mine else (None, None)
        started = time.perf_counter()
        if mine:
            sample_batches(model, tokenizer, options, plan, mine, info.is_main)
        if not info.is_main:
            return None
        if plan.manifest["complete"] and not plan.pending:
            report = report_of(out, plan.manifest, 0, 0.0, already_complete=True)
            log.console().print(
                f"{out} is complete: {report.prompts:,} prompts x {options.k} completions; nothing to do",
                soft_wrap=True,
            )
            return report
        wait_for_batches(out, plan)
        manifest = finish_samples(out, plan.manifest)
        new = sum(len(batch_indices(batch, plan.manifest)) for batch in plan.pending) * options.k
        report = report_of(out, manifest, new, time.perf_counter() - started)
        log.console().print(summary_table(report))
        return report
    finally:
        if info.is_main:
            lock.release()
        if started_group:
            destroy_distributed()


def open_samples_folder(options: SampleOptions, lock) -> SamplePlan:
    """Rank 0: read and tokenize the prompts, then create the folder (or check that the one there was sampled
    with the same settings) under the writer lock `lock`; the plan every rank follows."""
    from dpokit.fingerprint import tokenizer_fingerprint, weights_fingerprint
    from dpokit.model import check_adapter_dir, default_device, dtype_name, resolve_dtype
    from dpokit.reference.compute import model_identity

    out = Path(options.out)
    check_samples_target(options)
    if options.adapter:
        check_adapter_dir(options.adapter)
    tokenizer = load_tokenizer(options.model, options.chat_template)
    prompts = read_prompts(
        options.prompts, tokenizer, options.split, options.subset, options.column_map, options.system_prompt,
        options.max_prompt_length,
    )  # fmt: skip
    if not prompts.ids:
        raise DpokitError(f"{options.prompts}: no prompt to sample from ({skipped_text(prompts.skipped) or 'no rows'})")
    for reason, example in prompts.first_skipped.items():
        log.note(f"skipped {prompts.skipped[reason]} prompt(s) ({reason}); the first: {example}")
    num = len(prompts.ids)
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "model": model_identity(options.model),
        "adapter": model_identity(options.adapter) if options.adapter else None,
        "tokenizer": {"name": options.model, "fingerprint": tokenizer_fingerprint(tokenizer)},
        "prompts": source_identity(options.prompts),
        "num_prompts": num,
        "k": options.k,
        "seed": options.seed,
        "temperature": float(options.temperature),
        "top_p": float(options.top_p),
        "max_new_tokens": options.max_new_tokens,
        "batch_size": options.batch_size,
        "chat_template": options.chat_template,
        "system_prompt": options.system_prompt,
        "chat_template_text": tokenizer.chat_template or None,  # what rendered the prompts, as prepare records it
        "separator": None if tokenizer.chat_template else PLAIN_TURN_SEPARATOR,
        "split": options.split,
        "subset": options.subset,
        "column_map": parse_column_map(options.column_map, ALL_COLUMN_MAP_TARGETS),
        "max_prompt_length": options.max_prompt_length,
        "dtype": dtype_name(resolve_dtype(options.dtype, default_device())),
        "ref_logps": None,  # with --ref-logps: what a cache of the records' reference values claims
        "weights": weights_fingerprint(options.model),
        "adapter_weights": weights_fingerprint(options.adapter) if options.adapter else None,
        "prompts_fingerprint": prompts_fingerprint(prompts.ids),
        "num_batches": -(-num // options.batch_size),
        "complete": False,
        "counts": {
            "prompts": num,
            "completions": num * options.k,
            "unfinished": None,
            "skipped_prompts": dict(sorted(prompts.skipped.items())),
        },
        "dpokit_version": __version__,
    }
    if options.ref_logps:
        manifest["ref_logps"] = manifest_entry(manifest, options.model)
    out.mkdir(parents=True, exist_ok=True)
    if read_marker(out) is None:
        write_marker(out, KIND)  # no entry list: the folder fills over time
    lock.acquire()
    ours = [out / MANIFEST_FILE, out / SAMPLES_FILE, out / BATCHES_DIR]
    if options.overwrite:
        remove_within(out, KIND, ours)
    before = read_json(out / MANIFEST_FILE)
    if before is None:  # a new folder, or one stopped before its manifest: nothing in it is from these settings
        remove_within(out, KIND, ours[1:])
        write_manifest(out, manifest)
    else:
        check_same_settings(out, before, manifest)
        manifest = before
    (out / BATCHES_DIR).mkdir(exist_ok=True)
    pending = [batch for batch in range(manifest["num_batches"]) if not batch_path(out, batch).exists()]
    return SamplePlan(manifest, prompts.messages, prompts.ids, pending)


def source_identity(source: str) -> str:
    """A prompts source as recorded: an absolute path for a local file or folder, else the dataset name."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def check_same_settings(out: Path, before: dict, now: dict) -> None:
    """Refuse to resume `out` with settings other than those it was sampled with, naming the first that differs."""
    for key, flag in SETTING_FLAGS.items():
        old, new = before.get(key), now.get(key)
        if key == "tokenizer":
            old, new = (old or {}).get("fingerprint"), new["fingerprint"]
        elif key == "ref_logps":  # on or off: what it records follows from the model, weights and dtype
            old, new = old is not None, new is not None
        if old != new:
            named = flag.startswith(("--", "PROMPTS"))
            what = f"{flag} differs (it was {old!r:.80}, now {new!r:.80})" if named else f"{flag} changed"
            raise DpokitError(
                f"{out} was sampled with other settings: {what}; run the same command to finish "
                f"it, or pass --overwrite to sample again from the start, or choose another --out"
            )


# ----------------------------------------------------------------------------------------------
# sampling


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch `batch`: from (seed, batch) alone, so neither the process count nor a resume changes it."""
    import numpy as np

    return int(np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy and Python's random."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_sampler(options: SampleOptions, attn_implementation: str = "auto"):
    """The model to sample from (as the reference is loaded: frozen, eval mode, the adapter merged) on this process's
    device in ``--dtype`` with `attn_implementation` (``auto``: the family's default), and its tokenizer."""
    from dpokit.model import default_device, load_reference, resolve_dtype

    device = default_device()
    dtype = resolve_dtype(options.dtype, device)
    model = load_reference(options.model, dtype, device, options.adapter, attn_implementation)
    return model, load_tokenizer(options.model, options.chat_template)


def sample_batches(
    model, tokenizer, options: SampleOptions, plan: SamplePlan, batches: list[int], is_main: bool
) -> None:
    """Sample `batches` with `model`, each written to its file as it is done (with ``--ref-logps``, with each
    completion's log-prob under `model`); rank 0 shows the progress of every process (the batch files there)."""
    from dpokit.metrics import training_progress
    from dpokit.model import pad_token_id, stop_token_ids

    device = next(model.parameters()).device
    stop_ids, pad_id = sorted(stop_token_ids(model, tokenizer)), pad_token_id(model)
    out = Path(options.out)
    manifest = plan.manifest
    total = manifest["num_batches"]
    started, first_done = time.perf_counter(), total - len(plan.pending)
    layout = None  # with --ref-logps: checked on this process's first batch
    with training_progress(console=log.console(stderr=True), enabled=is_main) as progress:
        task = progress.add_task("sample", total=total, completed=first_done, rate="", status="")
        for batch in batches:
            indices = batch_indices(batch, manifest)
            seed_everything(batch_seed(options.seed, batch))
            completions = generate_completions(
                model, [plan.prompt_ids[i] for i in indices], options.k, options.temperature, options.top_p,
                options.max_new_tokens, stop_ids, pad_id, device,
            )  # fmt: skip
            references = None
            if options.ref_logps:  # the generated batch is in hand: its reference log-probs cost one forward
                groups = group_rows([plan.prompt_ids[i] for i in indices], [[ids for ids, _ in c] for c in completions])
                if layout is None:
                    layout = checked_sampler_layout(model, groups, out, plan, is_main)
                references = group_logps(model, groups, layout, device)
            records = batch_records(indices, plan, completions, tokenizer, references)
            write_batch(out, batch, records)
            if is_main:
                done = sum(1 for _ in (out / BATCHES_DIR).glob("batch_*.jsonl"))
                rate = (done - first_done) * options.batch_size * options.k / max(time.perf_counter() - started, 1e-9)
                progress.update(task, completed=done, rate=f"{rate:,.1f} completions/s")


def checked_sampler_layout(model, groups: list[dict], out: Path, plan: SamplePlan, is_main: bool):
    """The layout of the reference log-probs (`sampler_layout`); rank 0 records it in the manifest's ``ref_logps``
    (what a cache made from the records says it checked)."""
    layout = sampler_layout(model, groups, log.note if is_main else lambda _: None)
    reference = plan.manifest["ref_logps"]
    if is_main and reference.get("layout") != layout.name:
        reference["layout"] = layout.name
        write_manifest(out, plan.manifest)
    return layout


def generate_completions(
    model,
    prompt_ids: list[list[int]],
    k: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    device,
) -> list[list[tuple[list[int], bool]]]:
    """For each prompt, its k completions as (ids, finished): one `generate` call over the left-padded batch.

    Sampling reads torch's global RNG (seed it first); temperature 0 is greedy, one completion repeated k times.
    A completion's ids end at its first token of `stop_ids` (kept); one without it is cut at `max_new_tokens`.
    The model's own generation settings (its ``generation_config.json``) are replaced by empty ones: the
    samples follow these arguments and nothing else.
    """
    import torch
    from transformers import GenerationConfig

    width = max(map(len, prompt_ids))
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompt_ids], device=device)  # [B, P]
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
    common = dict(max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids), pad_token_id=pad_id, use_cache=True)
    if temperature == 0:  # generate's greedy search returns one sequence per prompt
        config, per_call = GenerationConfig(do_sample=False, **common), 1
    else:  # top_k=0: only the flags' temperature and top-p shape the distribution
        config, per_call = GenerationConfig(
            do_sample=True, temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=k, **common
        ), k  # fmt: skip
    # Else the checkpoint's settings (repetition penalty, top-k, min-p ...) fill what `config` leaves unset.
    model.generation_config = GenerationConfig()
    with torch.inference_mode():
        sequences = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    new_tokens = sequences[:, width:].cpu().tolist()  # [B * per_call, T]
    stops = set(stop_ids)
    rows = [until_stop(tokens, stops) for tokens in new_tokens]
    return [
        [rows[prompt * per_call + (sample if per_call > 1 else 0)] for sample in range(k)]
        for prompt in range(len(prompt_ids))
    ]


def until_stop(tokens: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    """`tokens` up to and including the first of `stop_ids` (finished), or all of them (not finished)."""
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: position + 1], True
    return tokens, False


def batch_indices(batch: int, manifest: dict) -> range:
    """The prompt indices of batch `batch`: ``[batch * B, (batch + 1) * B)``, cut at the last prompt."""
    size = manifest["batch_size"]
    return range(batch * size, min((batch + 1) * size, manifest["num_prompts"]))


def batch_records(indices: range, plan: SamplePlan, completions, tokenizer, references=None) -> list[dict]:
    """The records of a batch's prompts, in index order (the format of ``samples.jsonl``); with `references` (per
    prompt, its completions' log-probs and token counts), ``ref_logps`` and ``ref_tokens`` too."""
    records = []
    for position, (index, samples) in enumerate(zip(indices, completions)):
        ids = [completion for completion, _ in samples]
        record = {
            "index": index,
            "prompt": plan.prompt_messages[index],
            "prompt_ids": plan.prompt_ids[index],
            "completions": tokenizer.batch_decode(ids, skip_special_tokens=True),
            "completion_ids": ids,
            "finished": [finished for _, finished in samples],
        }
        if references is not None:
            record.update(zip(REF_KEYS, references[position]))
        records.append(record)
    return records


def batch_path(out: Path, batch: int) -> Path:
    return Path(out) / BATCHES_DIR / f"batch_{batch:06d}.jsonl"


def write_batch(out: Path, batch: int, records: list[dict]) -> Path:
    """Write a batch's records through a temporary file renamed into place: the file is whole or absent."""
    text = "".join(json_line(record) for record in records)
    return replace_within(out, KIND, batch_path(out, batch), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def wait_for_batches(out: Path, plan: SamplePlan, poll_seconds: float = 0.2) -> None:
    """Rank 0 waits for the other processes' batch files. No collective: a process with more batches left (after
    a resume) may take longer than a collective's timeout; a process that fails stops all of them (the launcher)."""
    missing = [batch for batch in plan.pending if not batch_path(out, batch).exists()]
    while missing:
        time.sleep(poll_seconds)
        missing = [batch for batch in missing if not batch_path(out, batch).exists()]


# ----------------------------------------------------------------------------------------------
# finishing and reading


def finish_samples(out: Path, manifest: dict) -> dict:
    """Join the batch files into ``samples.jsonl`` (checked: every prompt once, in order) and mark the manifest
    complete with the count of unfinished completions; returns the manifest."""
    unfinished = 0

    def join(tmp: Path) -> None:
        nonlocal unfinished
        with open(tmp, "w", encoding="utf-8") as joined:
            for batch in range(manifest["num_batches"]):
                path = batch_path(out, batch)
                expected = batch_indices(batch, manifest)
                records = list(batch_file_records(path))
                problem = batch_problem(records, expected, manifest["k"], manifest.get("ref_logps") is not None)
                if problem is not None:
                    raise DpokitError(
                        f"{path}: {problem}; delete it and run the same dpokit sample command again to sample it again"
                    )
                for record in records:
                    unfinished += record["finished"].count(False)
                    joined.write(json_line(record))

    replace_within(out, KIND, out / SAMPLES_FILE, join)
    manifest = {**manifest, "complete": True, "counts": {**manifest["counts"], "unfinished": unfinished}}
    write_manifest(out, manifest)
    return manifest


def batch_file_records(path: Path) -> Iterator[dict]:
    return jsonl_records(path, "delete the file and run the same dpokit sample command again to sample it again")


def jsonl_records(path: Path, fix: str) -> Iterator[dict]:
    """The records of a JSON-lines file, one at a time; a damaged line is an error naming it and `fix`."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise DpokitError(f"{path} line {number}: not valid JSON ({exc.msg}); {fix}") from exc


def batch_problem(records: list[dict], expected: range, k: int, reference: bool = False) -> Optional[str]:
    """What is wrong with a batch file's records (None when they are the prompts `expected`, k completions each,
    and with `reference` (``--ref-logps``) k reference log-probs and token counts each)."""
    indices = [record.get("index") for record in records]
    if indices != list(expected):
        return f"it holds prompts {indices[:3]}..., not {expected.start}..{expected.stop - 1}"
    for record in records:
        if not len(record.get("completion_ids", ())) == len(record.get("finished", ())) == k:
            return f"prompt {record['index']} does not have {k} completions"
        if reference and not all(len(record.get(key) or ()) == k for key in REF_KEYS):
            return f"prompt {record['index']} does not have {k} reference log-probs (--ref-logps)"
    return None


def write_manifest(out: Path, manifest: dict) -> None:
    write_text_within(out, KIND, Path(out) / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DpokitError(f"{path}: not readable JSON ({exc}); pass --overwrite to sample again") from exc


def samples_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a complete `dpokit sample` folder; refuses anything else, saying what to do."""
    path = Path(path)
    reason = not_own_reason(path, KIND)
    if reason is not None:
        raise DpokitError(f"{path} is not a `dpokit sample` output ({reason}); give the --out of dpokit sample")
    manifest = read_json(path / MANIFEST_FILE)
    if manifest is None:
        raise DpokitError(
            f"{path} has no {MANIFEST_FILE}: it is not complete: run the same dpokit sample command again to finish it"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DpokitError(
            f"{path}: samples format version {manifest.get('format_version')!r}, this dpokit reads {FORMAT_VERSION}; "
            "sample again with this version"
        )
    if not manifest.get("complete") or not (path / SAMPLES_FILE).is_file():
        done = sum(1 for _ in (path / BATCHES_DIR).glob("batch_*.jsonl")) if (path / BATCHES_DIR).is_dir() else 0
        raise DpokitError(
            f"{path} is not complete ({done} of {manifest.get('num_batches', '?')} batches sampled): run the same "
            "dpokit sample command again to finish it"
        )
    return manifest


def load_samples(path: str | os.PathLike) -> tuple[dict, Iterator[dict]]:
    """(manifest, records) of a complete `dpokit sample` folder; the records are read lazily, one per prompt in
    index order: ``index``, ``prompt`` (messages), ``prompt_ids``, and k ``completions`` (text),
    ``completion_ids`` and ``finished`` (and, sampled with ``--ref-logps``, k ``ref_logps`` and ``ref_tokens``)."""
    manifest = samples_manifest(path)
    return manifest, sample_records(Path(path) / SAMPLES_FILE)


def sample_records(path: Path) -> Iterator[dict]:
    """The records of a ``samples.jsonl``, one at a time; a damaged line names itself."""
    return jsonl_records(path, "run dpokit sample again with --overwrite")


def is_samples_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a `dpokit sample` folder (complete or not)."""
    return is_dpokit_artifact(path, KIND)


# ----------------------------------------------------------------------------------------------
# reporting


def report_of(out: Path, manifest: dict, new: int, seconds: float, already_complete: bool = False) -> SampleReport:
    counts = manifest["counts"]
    return SampleReport(
        out=out,
        prompts=counts["prompts"],
        completions=counts["completions"],
        unfinished=counts["unfinished"] or 0,
        skipped=counts["skipped_prompts"],
        new_completions=new,
        seconds=seconds,
        already_complete=already_complete,
    )


def skipped_text(skipped: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count:,}" for reason, count in sorted(skipped.items()))


def summary_table(report: SampleReport):
    """The closing table: prompts, completions (new this run), unfinished, skipped prompts, time and rate."""
    from dpokit.metrics import summary_table as table

    seconds = max(report.seconds, 1e-9)
    rows = [
        ("prompts", f"{report.prompts:,}"),
        ("completions", f"{report.completions:,} ({report.new_completions:,} sampled now)"),
        ("unfinished (hit --max-new-tokens)", f"{report.unfinished:,}"),
        ("skipped prompts", skipped_text(report.skipped) or "0"),
        ("seconds", f"{report.seconds:.1f}"),
        ("completions/s", f"{report.new_completions / seconds:,.1f}"),
    ]
    return table(f"samples → {report.out}", rows)
