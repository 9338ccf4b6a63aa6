"""The `dpokit` command line: parses arguments, then calls one library function per command."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any, List, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape

from dpokit import __version__, log
from dpokit.config import train_flags
from dpokit.errors import DpokitError, filesystem_error_line
from dpokit.host_memory import configure_host_memory

app = typer.Typer(
    help="Preference fine-tuning with DPO-family losses and a reference model that runs once.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# True in the `dpokit` command's own process, which runs one command and exits (not in tests or in a program
# that imports dpokit): `train` and `quickstart` then keep bitsandbytes out when the run does not use it.
own_process = False

FLAG_METAVAR = ""  # an on/off flag takes no value: its help shows none (not "<bool>")


def flag_option(*args: Any, **kwargs: Any):
    """`typer.Option` for an on/off flag: no value shown in the help."""
    return typer.Option(*args, metavar=FLAG_METAVAR, **kwargs)


cache_app = typer.Typer(help="Inspect, verify and audit reference caches (ref.h5).", no_args_is_help=True)
config_app = typer.Typer(help="List and show training configs and their keys.", no_args_is_help=True)
eject_app = typer.Typer(help="Copy the training recipe or a config out for customisation.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(config_app, name="config")
import_app = typer.Typer(help="Convert another tool's training config into a dpokit config.", no_args_is_help=True)
app.add_typer(eject_app, name="eject")
app.add_typer(import_app, name="import")

err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dpokit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = flag_option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = flag_option(
        False, "--debug", help="The debug log level: decisions, and the causes under every error."
    ),
    log_level: Optional[str] = typer.Option(
        None, "--log-level", help="error, warning, info (default) or debug; also DPOKIT_LOG_LEVEL (read by `main`)."
    ),
) -> None:
    """Options that apply to every command."""


# ----------------------------------------------------------------------------------------------
# prepare


@app.command()
def prepare(
    data: str = typer.Argument(
        ...,
        help="A .json/.jsonl/.csv/.parquet file (.jsonl/.json/.csv also .gz/.bz2/.xz) or folder, or a dataset name for datasets.load_dataset.",
    ),
    model: str = typer.Option(
        ..., "--model", "-m", help="Model directory or hub name whose tokenizer (and chat template) to use."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (the prepared/ format)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer, when it differs from --model."),
    format: str = typer.Option(
        "auto",
        "--format",
        help="auto, plain, conversational, implicit, ranked (k scored completions per prompt) or unpaired (KTO: a completion with a true/false label); auto detects ranked and unpaired data.",
    ),
    column_map: Optional[str] = typer.Option(
        None,
        "--column-map",
        help="Rename columns, e.g. prompt=question or chosen=better,rejected=worse; pairs also system (a per-row system prompt) and score_chosen, score_rejected; ranked data: prompt, completions, scores, and score (the key in completion objects); unpaired data: prompt, completion, label; all: system.",
    ),
    system_prompt: Optional[str] = typer.Option(
        None,
        "--system-prompt",
        help="Add (or replace) a system turn in every row; rows with their own system text (a system column) keep theirs.",
    ),
    chat_template: Optional[str] = typer.Option(
        None, "--chat-template", help="A Jinja chat template (text or file) overriding the tokenizer's."
    ),
    split: Optional[str] = typer.Option(
        None,
        "--split",
        help="The train split of a dataset name or of a folder whose files are named by split (train_prefs-00000-of-00001.parquet, train.jsonl.gz), optionally sliced: train_prefs[:1000], train[:10%]. Default: train.",
    ),
    eval_split: Optional[str] = typer.Option(
        None,
        "--eval-split",
        help="The eval split, of --eval-data (default test) or, without it, of DATA: --split train_prefs --eval-split test_prefs.",
    ),
    subset: Optional[str] = typer.Option(
        None, "--subset", help="Dataset configuration name for datasets.load_dataset."
    ),
    max_length: int = typer.Option(1024, "--max-length", help="Max tokens of prompt+response."),
    max_prompt_length: Optional[int] = typer.Option(
        None,
        "--max-prompt-length",
        help="Cap every prompt at this many tokens (the end --truncation keeps); under keep_end also how far an over-long pair's prompt may be cut (default: half of --max-length).",
    ),
    max_completion_length: Optional[int] = typer.Option(
        None, "--max-completion-length", help="Cap every completion at its first N tokens."
    ),
    truncation: str = typer.Option(
        "keep_start",
        "--truncation",
        help="keep_start (TRL's default: the whole prompt, completions cut at their end) or keep_end (the prompt's start is cut first).",
    ),
    overlength: str = typer.Option(
        "truncate",
        "--overlength",
        help="truncate, drop or error for pairs (a ranked row: completions; an unpaired row: its completion) over --max-length.",
    ),
    separator: str = typer.Option(
        "\n\n",
        "--separator",
        help="Without a chat template: text between prompt and completion (added unless whitespace already divides "
        "them). Default: '\\n\\n' (a blank line).",
        show_default=False,  # the default itself would print as two blank lines
    ),
    eval_fraction: float = typer.Option(
        0.0, "--eval-fraction", help="Hold out this fraction of rows as the eval split."
    ),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="A separate source for the eval split."),
    seed: int = typer.Option(42, "--seed", help="Seed for the eval split."),
    num_proc: int = typer.Option(1, "--num-proc", help="Tokenization processes."),
    overwrite: bool = flag_option(False, "--overwrite", help="Replace an existing output directory."),
    show: int = typer.Option(
        0, "--show", help="Then show this many decoded train rows and the counts, as `dpokit inspect` does."
    ),
) -> None:
    """Tokenize preference pairs, ranked completions or unpaired (KTO) rows into a prepared/ directory (formats: docs/data-formats.md)."""
    from dpokit.data.pipeline import PrepareOptions, run_prepare

    run_prepare(
        PrepareOptions(
            data=data,
            model=model,
            out=out,
            tokenizer=tokenizer,
            format=format,
            column_map=column_map,
            system_prompt=system_prompt,
            chat_template=chat_template,
            split=split,
            eval_split=eval_split,
            subset=subset,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            max_completion_length=max_completion_length,
            truncation=truncation,
            overlength=overlength,
            separator=separator,
            eval_fraction=eval_fraction,
            eval_data=eval_data,
            seed=seed,
            num_proc=num_proc,
            overwrite=overwrite,
        )
    )
    if show:
        from dpokit.data.inspection import inspect_prepared

        inspect_prepared(out, rows=show)


@app.command("inspect")
def inspect_data(
    prepared: Path = typer.Argument(..., help="Prepared data directory (from `dpokit prepare`)."),
    rows: int = typer.Option(3, "--rows", "-n", help="How many rows to show."),
    split: str = typer.Option("train", "--split", help="The split to show rows of (train or eval)."),
    start: int = typer.Option(0, "--start", help="The first row to show."),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="The tokenizer to decode with (default: the one the manifest records)."
    ),
) -> None:
    """Show prepared rows decoded (special tokens highlighted, token counts per part) and the manifest's counts."""
    from dpokit.data.inspection import inspect_prepared

    inspect_prepared(prepared, split, rows, start, tokenizer)


# ----------------------------------------------------------------------------------------------
# ref-logps and cache


@app.command()
def sample(
    prompts: str = typer.Argument(
        ...,
        help="Prompts: a .txt file (one a line), rows with a prompt column (.json/.jsonl/.csv/.parquet file or folder, or a dataset name), or preference data (its prompts).",
    ),
    model: str = typer.Option(..., "--model", "-m", help="Model directory or hub name to sample from."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (samples/); an unfinished one is resumed."),
    k: int = typer.Option(8, "--k", help="Completions per prompt."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="A PEFT adapter directory merged into the model."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the most likely tokens up to this mass."),
    max_new_tokens: int = typer.Option(
        128, "--max-new-tokens", help="Tokens per completion at most; one cut there is marked unfinished."
    ),
    batch_size: int = typer.Option(
        8, "--batch-size", help="Prompts per generate call (per process); part of what fixes the samples."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed; batch b is sampled from (seed, b) alone."),
    gpus: int = typer.Option(
        1, "--gpus", help="Processes to launch (one per GPU; gloo processes on CPU). Ignored under torchrun."
    ),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32."),
    chat_template: Optional[str] = typer.Option(
        None, "--chat-template", help="A Jinja chat template (text or file) overriding the tokenizer's."
    ),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="Add (or replace) a system turn."),
    split: Optional[str] = typer.Option(
        None, "--split", help="The split of a dataset name or a split-named folder (default train), e.g. test[:100]."
    ),
    subset: Optional[str] = typer.Option(
        None, "--subset", help="Dataset configuration name for datasets.load_dataset."
    ),
    column_map: Optional[str] = typer.Option(
        None, "--column-map", help="Rename columns, e.g. prompt=question (preference data: as for prepare)."
    ),
    max_prompt_length: Optional[int] = typer.Option(
        None, "--max-prompt-length", help="Skip (and count) prompts of more tokens than this."
    ),
    ref_logps: bool = flag_option(
        False,
        "--ref-logps",
        help="Also store each completion's log-prob under the model (when it is the reference), so that "
        "`dpokit select` writes the reference cache without a `dpokit ref-logps` pass.",
    ),
    overwrite: bool = flag_option(
        False, "--overwrite", help="Start a dpokit sample folder over (e.g. with other settings)."
    ),
) -> None:
    """Sample k completions per prompt from a model into a samples/ folder (docs/on-policy.md)."""
    from dpokit.onpolicy.sample import SampleOptions, run_sample

    check_gpus(gpus)
    run_sample(
        SampleOptions(
            prompts=prompts,
            model=model,
            out=str(out),
            k=k,
            adapter=adapter,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            gpus=gpus,
            dtype=dtype,
            chat_template=chat_template,
            system_prompt=system_prompt,
            split=split,
            subset=subset,
            column_map=column_map,
            max_prompt_length=max_prompt_length,
            ref_logps=ref_logps,
            overwrite=overwrite,
        )
    )


def check_gpus(gpus: int) -> None:
    """Refuse a process count below 1 (which would otherwise silently run one process)."""
    if gpus < 1:
        raise DpokitError(
            f"--gpus must be at least 1, got {gpus} (the processes to launch, one per GPU; 1 runs in this process)"
        )


@app.command("ref-logps")
def ref_logps(
    prepared: Path = typer.Argument(..., help="Prepared data directory (from `dpokit prepare`)."),
    model: str = typer.Option(..., "--model", "-m", help="Reference model directory or hub name."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="The cache file to write (e.g. ref.h5); an unfinished one is resumed."
    ),
    gpus: int = typer.Option(
        1, "--gpus", help="Processes to launch (one per GPU; gloo processes on CPU). Ignored under torchrun."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Pairs per forward pass (per process)."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32."),
    splits: Optional[str] = typer.Option(
        None, "--splits", help="Comma-separated splits to compute, e.g. train,eval (default: all)."
    ),
    adapter: Optional[str] = typer.Option(
        None, "--adapter", help="A PEFT adapter directory merged into the reference."
    ),
    overwrite: bool = flag_option(False, "--overwrite", help="Replace a cache made from other data, model or dtype."),
    no_bucket: bool = flag_option(False, "--no-bucket", help="Batch rows in index order instead of sorted by length."),
    attn_implementation: str = typer.Option(
        "auto",
        "--attn-implementation",
        help="auto (SDPA where the family supports it, else eager), sdpa, eager or flex_attention (forward only on CPU); recorded in the cache.",
    ),
    per_token: bool = flag_option(
        False,
        "--per-token",
        help="Also store every completion token's log-prob (for token-level losses such as ld_dpo).",
    ),
    threads: Optional[int] = typer.Option(
        None,
        "--threads",
        help="CPU only: torch threads per process (default: the cores, shared among --gpus N processes).",
    ),
    shard_model: bool = flag_option(
        False,
        "--shard-model",
        help="With --gpus N (or torchrun): shard the reference's weights over the processes with FSDP2, for a model "
        "bigger than one GPU; each forward then gathers it layer by layer. Same values.",
    ),
) -> None:
    """Run the frozen reference once over prepared data and cache its log-probs in HDF5."""
    from dpokit.reference.compute import RefLogpsOptions, run_ref_logps

    check_gpus(gpus)

    run_ref_logps(
        RefLogpsOptions(
            prepared=str(prepared),
            model=model,
            out=str(out),
            gpus=gpus,
            batch_size=batch_size,
            dtype=dtype,
            splits=[s.strip() for s in splits.split(",") if s.strip()] if splits else None,
            adapter=adapter,
            overwrite=overwrite,
            bucket=not no_bucket,
            attn_implementation=attn_implementation,
            per_token=per_token,
            threads=threads,
            shard_model=shard_model,
        )
    )


@cache_app.command("info")
def cache_info(file: Path = typer.Argument(..., help="A reference cache (ref.h5).")) -> None:
    """Show a cache's splits (rows done/total), model, dtype, fingerprints and creation time."""
    from dpokit.reference.cache import open_cache
    from dpokit.reference.inspection import cache_info_table

    Console().print(cache_info_table(open_cache(file)))


@cache_app.command("verify")
def cache_verify(
    file: Path = typer.Argument(..., help="A reference cache (ref.h5)."),
    prepared: Optional[Path] = typer.Argument(
        None, help="The prepared data it was built from (default: the one the cache records)."
    ),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="The reference model (default: the one the cache records)."
    ),
    adapter: Optional[str] = typer.Option(
        None, "--adapter", help="The PEFT adapter (default: the one the cache records, if any)."
    ),
    sample: int = typer.Option(32, "--sample", help="Rows to recompute, drawn at random over all splits."),
    tolerance: Optional[float] = typer.Option(
        None,
        "--tolerance",
        help="Largest allowed absolute log-prob difference (default: 1e-4 for a float32 cache, 0.1 for bf16).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Pairs per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random sample."),
) -> None:
    """Recompute a random sample of a cache live; exit non-zero if a difference exceeds the tolerance."""
    from dpokit.reference.inspection import verify_cache

    verify_cache(str(file), str(prepared) if prepared else None, model, adapter, sample, tolerance, batch_size, seed)


@cache_app.command("audit")
def cache_audit(
    file: Path = typer.Argument(..., help="A finished reference cache (ref.h5)."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="The prepared data it was built from (default: the one the cache records)."
    ),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        "-o",
        help="Folder for audit.json and the plots (default: REF-audit/ next to the cache); an earlier audit there is replaced.",
    ),
    top: int = typer.Option(10, "--top", help="Pairs listed per split that the reference disagrees with most."),
    write_filtered: Optional[Path] = typer.Option(
        None,
        "--write-filtered",
        help="Write the rows --drop keeps as a new prepared dataset here, with its reference cache.",
    ),
    drop: Optional[str] = typer.Option(
        None,
        "--drop",
        help="With --write-filtered: comma-separated reasons to drop a pair: identical, ref-disagrees, dup-prompts.",
    ),
    min_margin: float = typer.Option(
        0.0,
        "--min-margin",
        help="ref-disagrees drops pairs whose reference margin (chosen - rejected log-prob) is below this.",
    ),
    filtered_cache: Optional[Path] = typer.Option(
        None, "--filtered-cache", help="The filtered data's cache (default: OUT-ref.h5 next to --write-filtered OUT)."
    ),
    filter_eval: bool = flag_option(
        False,
        "--filter-eval",
        help="Also filter the eval split (by default it is copied whole, so eval metrics stay comparable).",
    ),
    overwrite: bool = flag_option(
        False, "--overwrite", help="Replace an earlier --write-filtered output and its cache."
    ),
) -> None:
    """Report what the reference thinks of the data (accuracy, margins, length bias, identical pairs, duplicate
    prompts, worst pairs); optionally write a filtered prepared dataset and its cache (docs/audit.md)."""
    from dpokit.reference.audit import AuditOptions, run_audit

    run_audit(
        AuditOptions(
            cache=str(file),
            prepared=str(data) if data else None,
            out=str(out) if out else None,
            top=top,
            write_filtered=str(write_filtered) if write_filtered else None,
            drop=drop.split(",") if drop else (),
            min_margin=min_margin,
            filtered_cache=str(filtered_cache) if filtered_cache else None,
            filter_eval=filter_eval,
            overwrite=overwrite,
        )
    )


# ----------------------------------------------------------------------------------------------
# train


TRAIN_FLAGS = train_flags()  # declared on the config schema


def train_argv(params: dict[str, Any]) -> list[str]:
    """A recipe's command line (``--config`` and dotted overrides) from `dpokit train`'s parsed options.

    `--loss` replaces the config's whole loss section, so a config's `beta` for dpo does not follow
    the switch to `--loss rso`; `--beta/--gamma/--tau` then set the new loss's parameters. `--ref-cache`
    alone also selects the cache as the reference source.
    """
    argv = ["--config", params["config"]] if params.get("config") else []
    for flag in TRAIN_FLAGS:
        value = params.get(flag.name)
        if value is None or value is False:
            continue
        if flag.type is bool:
            value = "true"
        argv.append(f"{flag.key}={value}")
    if params.get("ref_cache") and params.get("ref") is None:
        argv.append("reference.source=cache")
    return argv + list(params.get("overrides") or [])


def _train(**params: Any) -> None:
    """Train a policy with a DPO-family loss from prepared data and a reference cache."""
    from dpokit.launch import run_recipe

    check_gpus(params["gpus"])
    run_recipe(params["recipe"], train_argv(params), params["gpus"], own_process=own_process)


def _train_parameters() -> list[inspect.Parameter]:
    """`dpokit train`'s signature for Typer: the fixed arguments, then one option per `TRAIN_FLAGS` entry."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    fixed = [
        (
            "overrides",
            Optional[List[str]],
            typer.Argument(None, help="Dotted overrides, e.g. optimizer.lr=1e-5 lora.rank=16."),
        ),
        (
            "config",
            Optional[str],
            typer.Option(
                None, "--config", "-c", help="A shipped config name (see `dpokit config list`) or a YAML path."
            ),
        ),
    ]
    flags = [
        (
            flag.name,
            bool if flag.type is bool else Optional[flag.type],
            typer.Option(
                False if flag.type is bool else None,
                flag.option,
                *([flag.short] if flag.short else []),
                help=escape(flag.help),  # "[dpo,sft]" is text, not Rich markup
                metavar=FLAG_METAVAR if flag.type is bool else None,
            ),
        )
        for flag in TRAIN_FLAGS
    ]
    last = [
        (
            "recipe",
            Optional[Path],
            typer.Option(None, "--recipe", help="Run this recipe file (e.g. one made by `dpokit eject recipe`)."),
        ),
        ("gpus", int, typer.Option(1, "--gpus", help="Processes to launch (one per GPU; gloo processes on CPU).")),
    ]
    return [
        inspect.Parameter(name, keyword, default=default, annotation=hint)
        for name, hint, default in fixed + flags + last
    ]


_train.__signature__ = inspect.Signature(_train_parameters())
_train.__annotations__ = {p.name: p.annotation for p in _train.__signature__.parameters.values()}
train = app.command("train", context_settings={"allow_extra_args": False})(_train)


@app.command()
def plot(
    run: Path = typer.Argument(..., help="A run directory (with metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the PNGs (default RUN/plots)."),
) -> None:
    """Write PNG curves of a run: loss, reward accuracy, margins, rewards (train vs eval)."""
    from dpokit.metrics import plot_run, read_metrics

    if not read_metrics(run):
        raise DpokitError(f"{run} has no metrics.jsonl records; is it a `dpokit train` run directory?")
    for path in plot_run(run, out):
        typer.echo(str(path))


@app.command()
def score(
    samples: Path = typer.Argument(..., help="A samples folder (from `dpokit sample`)."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="The scored folder to write (scored/); an unfinished one is resumed."
    ),
    reward_model: Optional[str] = typer.Option(
        None,
        "--reward-model",
        help="A reward model directory or hub name (AutoModelForSequenceClassification, num_labels=1); it reads the "
        "conversation through its own tokenizer and chat template.",
    ),
    scorer: Optional[str] = typer.Option(
        None,
        "--scorer",
        help="Instead of a reward model: a Python function pkg.module:function(prompts, completions) -> list of floats "
        "(rules, verifiers, a judge).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Completions per reward-model forward (or function call)."),
    gpus: int = typer.Option(
        1, "--gpus", help="Processes to launch (one per GPU; gloo processes on CPU). Ignored under torchrun."
    ),
    overwrite: bool = flag_option(
        False, "--overwrite", help="Replace a scored folder made from other samples or another scorer."
    ),
) -> None:
    """Score every sampled completion with a reward model or a Python function, into a scored/ folder (docs/on-policy.md)."""
    from dpokit.onpolicy.score import ScoreOptions, run_score

    check_gpus(gpus)
    run_score(
        ScoreOptions(
            samples=str(samples),
            out=str(out),
            reward_model=reward_model,
            scorer=scorer,
            batch_size=batch_size,
            gpus=gpus,
            overwrite=overwrite,
        )
    )


@app.command()
def select(
    scored: Path = typer.Argument(..., help="A scored folder (from `dpokit score`)."),
    rule: str = typer.Option(
        "best_worst",
        "--rule",
        help="best_worst (the best completion against the worst), best_random (the best against a random lower one), "
        "all (a ranked group of all k, for ranked losses) or rso (RSO's statistical rejection sampling, pairs in "
        "acceptance order).",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output directory (the prepared/ format `ref-logps` and `train` read)."
    ),
    eval_fraction: float = typer.Option(
        0.0, "--eval-fraction", help="Hold out this fraction of prompts as the eval split."
    ),
    seed: int = typer.Option(42, "--seed", help="Seed for the eval split and for best_random's and RSO's draws."),
    rso_beta: float = typer.Option(
        0.5, "--rso-beta", help="rso: the temperature of acceptance, exp((reward - max reward) / beta)."
    ),
    rso_samples: int = typer.Option(
        4, "--rso-samples", help="rso: completions to accept per prompt (even; paired two by two)."
    ),
    drop_unfinished: bool = flag_option(
        False, "--drop-unfinished", help="Leave out completions that hit the sampler's --max-new-tokens (counted)."
    ),
    ref_cache: Optional[Path] = typer.Option(
        None,
        "--ref-cache",
        help="Where to write the reference cache of the output, when the samples carry their log-probs (dpokit "
        "sample --ref-logps); default: OUT-ref.h5 next to it.",
    ),
    overwrite: bool = flag_option(
        False, "--overwrite", help="Replace an earlier prepared output and its reference cache (nothing else)."
    ),
) -> None:
    """Select pairs (or ranked groups) from scored completions into a prepared/ directory (docs/on-policy.md)."""
    from dpokit.onpolicy.select import SelectOptions, run_select

    run_select(
        SelectOptions(
            scored=str(scored),
            out=str(out),
            rule=rule,
            eval_fraction=eval_fraction,
            seed=seed,
            rso_beta=rso_beta,
            rso_samples=rso_samples,
            drop_unfinished=drop_unfinished,
            ref_cache=str(ref_cache) if ref_cache else None,
            overwrite=overwrite,
        )
    )


@app.command()
def export(
    run: Path = typer.Argument(..., help="A run directory or one of its checkpoints."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the exported model."),
    merge: bool = flag_option(True, "--merge/--no-merge", help="Merge the adapter into the base model."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Base model (default: the run's model.path)."),
    overwrite: bool = flag_option(
        False, "--overwrite", help="Replace an earlier `dpokit export` output (nothing else)."
    ),
) -> None:
    """Export a run's latest checkpoint; LoRA-family adapters are merged into a full HF model."""
    from dpokit.export import export_run

    typer.echo(str(export_run(run, out, merge, base_model, overwrite)))


@app.command()
def plan(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Dotted overrides, e.g. data.batch_size=2 model.activation_checkpointing=true."
    ),
    config: Optional[str] = typer.Option(
        None, "--config", "-c", help="A shipped config name (see `dpokit config list`) or a YAML path."
    ),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="A model folder or its config.json (default: model.path; the shipped configs' models ship their config.json). Nothing is downloaded.",
    ),
    gpus: int = typer.Option(
        1, "--gpus", help="Processes, one per GPU: FSDP2 shards weights, gradients and optimizer state over them."
    ),
    gpu_memory: Optional[str] = typer.Option(
        None, "--gpu-memory", help="Memory of one GPU, e.g. 80GB, 24GiB, 40960MiB (GB: 10^9 bytes; default 80GB)."
    ),
    data: Optional[Path] = typer.Option(
        None, "--data", help="Prepared data (`dpokit prepare`): plan for its longest pair."
    ),
    seq_len: Optional[int] = typer.Option(
        None, "--seq-len", help="Without --data: tokens per sequence, prompt + completion (default 1024)."
    ),
    device: str = typer.Option(
        "cuda", "--device", help="cuda (model.dtype auto: bf16) or cpu (fp32 and CPU's logits budget)."
    ),
) -> None:
    """Estimate a training run's memory per GPU before starting it; exit 1 if it does not fit."""
    from dpokit.plan import plan_memory, plan_report

    result = plan_memory(config, overrides or [], model, gpus, gpu_memory, str(data) if data else None, seq_len, device)
    Console().print(plan_report(result))
    if not result.fits:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------------------------
# config


@config_app.command("list")
def config_list() -> None:
    """List the shipped training configs."""
    from dpokit.config import shipped_config_names

    for name in shipped_config_names():
        typer.echo(name)


@config_app.command("keys")
def config_keys(
    prefix: Optional[str] = typer.Argument(None, help="Only keys that start with this, e.g. training or loss."),
) -> None:
    """List every config key: its type, default and what it does (ranges, null, flag, resume)."""
    from rich.table import Table

    from dpokit.config import describe_settings

    table = Table(box=None, show_edge=False, pad_edge=False)
    table.add_column("key", no_wrap=True)
    table.add_column("type", max_width=22, overflow="fold")
    table.add_column("default", max_width=16, overflow="fold")
    table.add_column("what it does", ratio=1)
    for key, kind, default, doc in describe_settings():
        if prefix is None or key.startswith(prefix):
            table.add_row(key, escape(kind), escape(default), escape(doc))
    Console(width=max(120, Console().width)).print(table)


@config_app.command("show")
def config_show(
    name: str = typer.Argument(..., help="A shipped config name or a YAML path."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides to apply before showing."),
) -> None:
    """Print the merged, validated config (defaults + file + overrides) as YAML."""
    from dpokit.config import config_to_yaml, load_config

    typer.echo(config_to_yaml(load_config(name, overrides or [])), nl=False)


# ----------------------------------------------------------------------------------------------
# import


@import_app.command("torchtune")
def import_torchtune(
    config: Path = typer.Argument(
        ..., help="A torchtune DPO recipe config (YAML), e.g. 8B_lora_dpo_single_device.yaml."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="The dpokit config to write; pass it to `dpokit train --config`."
    ),
    overwrite: bool = flag_option(
        False, "--overwrite", help="Replace a config an earlier `dpokit import` wrote (nothing else)."
    ),
) -> None:
    """Convert a torchtune DPO config into a dpokit config; print what to run and what has no equivalent."""
    from dpokit.torchtune_config import import_torchtune as convert_file
    from dpokit.torchtune_config import summary

    typer.echo(summary(convert_file(config, out, overwrite), out))


# ----------------------------------------------------------------------------------------------
# eject and quickstart


@eject_app.command("recipe")
def eject_recipe(
    dest: Optional[Path] = typer.Argument(
        None, help="Where to write it (a file or a folder; default ./dpo_recipe.py)."
    ),
    force: bool = flag_option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Copy the training recipe out; run the copy with `dpokit train --recipe FILE`, python or torchrun."""
    from dpokit.eject import eject_recipe as eject

    path = eject(dest, force)
    typer.echo(f"wrote {path}; run it with: dpokit train --recipe {path} --config CONFIG ...")


@eject_app.command("config")
def eject_config(
    name: str = typer.Argument(..., help="A shipped config name (see `dpokit config list`)."),
    dest: Optional[Path] = typer.Argument(None, help="Where to write it (a file or a folder; default ./NAME.yaml)."),
    force: bool = flag_option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Copy a shipped config out; pass the copy to `--config`."""
    from dpokit.eject import eject_config as eject

    path = eject(name, dest, force)
    typer.echo(f"wrote {path}; use it with: dpokit train --config {path} ...")


@app.command()
def quickstart(
    out: Path = typer.Option(Path("quickstart"), "--out", "-o", help="Folder for prepared/, ref.h5 and run/."),
    max_steps: Optional[int] = typer.Option(
        None, "--max-steps", help="Optimizer steps (default: the demo_lora config's)."
    ),
    overwrite: bool = flag_option(False, "--overwrite", help="Run again in a folder that has a quickstart run."),
    threads: int = typer.Option(
        1,
        "--threads",
        help="CPU threads for torch (1: the demo model is tiny, and more threads slow it down badly on a busy machine).",
    ),
) -> None:
    """Prepare, cache the reference and train (LoRA DPO) on the bundled tiny demo; show before/after."""
    from dpokit.quickstart import run_quickstart

    run_quickstart(out, max_steps, overwrite, threads, own_process=own_process)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def iterate(
    ctx: typer.Context,
    prompts: str = typer.Argument(
        ..., help="Prompts: any data `dpokit sample` reads (a .txt, a prompt column, pairs)."
    ),
    model: str = typer.Option(..., "--model", help="The starting policy (the SFT model): round 1 samples from it."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for round_1/, round_2/, ... and iterate.json."),
    config: str = typer.Option(..., "--config", help="The training config each round runs (`dpokit config list`)."),
    rounds: int = typer.Option(2, "--rounds", help="Rounds of sample -> score -> select -> train."),
    reward_model: Optional[str] = typer.Option(None, "--reward-model", help="A one-output sequence classifier."),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="Or a Python function, pkg.module:function."),
    k: int = typer.Option(4, "--k", help="Completions sampled per prompt each round."),
    rule: str = typer.Option("best_worst", "--rule", help="best_worst, best_random, all (ranked) or rso."),
    rso_beta: float = typer.Option(0.5, "--rso-beta", help="RSO's beta (--rule rso)."),
    rso_samples: int = typer.Option(4, "--rso-samples", help="Completions RSO accepts per prompt (even)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling's probability mass."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Longest completion, in tokens."),
    sample_batch_size: int = typer.Option(8, "--sample-batch-size", help="Prompts per sampling batch."),
    seed: int = typer.Option(0, "--seed", help="Round n samples with seed + n."),
    reference: str = typer.Option(
        "previous", "--reference", help="previous: each round's reference is its starting policy; fixed: --model."
    ),
    eval_fraction: float = typer.Option(0.0, "--eval-fraction", help="Prompts held out for each round's eval."),
    split: Optional[str] = typer.Option(
        None, "--split", help="The prompts' split of a dataset name or split-named folder (default train)."
    ),
    gpus: int = typer.Option(1, "--gpus", help="Processes for every stage."),
    overwrite: bool = flag_option(False, "--overwrite", help="Start again in a folder dpokit iterate wrote."),
) -> None:
    """Rounds of on-policy DPO: sample, score, select, reference, train; extra key=value args go to every train."""
    from dpokit.iterate import IterateOptions, run_iterate

    check_gpus(gpus)
    run_iterate(
        IterateOptions(
            prompts=prompts,
            model=model,
            out=out,
            config=config,
            rounds=rounds,
            reward_model=reward_model,
            scorer=scorer,
            k=k,
            rule=rule,
            rso_beta=rso_beta,
            rso_samples=rso_samples,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            sample_batch_size=sample_batch_size,
            seed=seed,
            reference=reference,
            eval_fraction=eval_fraction,
            split=split,
            gpus=gpus,
            overrides=list(ctx.args),
            overwrite=overwrite,
        ),
        own_process=own_process,
    )


# ----------------------------------------------------------------------------------------------
# main


def _typer_click_errors() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(exit, abort, usage) exception types: Typer >= 0.20 bundles its own copy of click."""
    exits, aborts, usage = [click.exceptions.Exit], [click.exceptions.Abort], [click.ClickException]
    exits.append(getattr(typer, "Exit", click.exceptions.Exit))
    aborts.append(getattr(typer, "Abort", click.exceptions.Abort))
    try:
        from typer._click import exceptions as bundled

        usage.append(bundled.ClickException)
    except ImportError:
        pass
    return tuple(exits), tuple(aborts), tuple(usage)


EXIT_ERRORS, ABORT_ERRORS, USAGE_ERRORS = _typer_click_errors()


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: run the app; `DpokitError` becomes one red line (and its causes at the debug level)."""
    args = list(sys.argv[1:] if argv is None else argv)
    with log.level_restored():
        return _run(args)


def _run(args: list[str]) -> int:
    try:
        _set_log_level(args)
        result = app(args=args, prog_name="dpokit", standalone_mode=False)
        # Typer hands back an interrupt (Ctrl-C) as exit code 130 instead of raising it.
        return result if isinstance(result, int) else 0
    except DpokitError as exc:
        code = getattr(exc, "exit_code", 1)  # 75: interrupted, with a checkpoint to resume from
        label = "[bold red]error:[/]" if code == 1 else "[bold yellow]stopped:[/]"
        err_console.print(
            f"{label} {escape(str(exc))}", highlight=False, soft_wrap=True
        )  # "[plot]" is text, not markup
        log.print_causes(exc)
        return code
    except OSError as exc:
        line = filesystem_error_line(exc)
        if line is None:
            raise
        err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        log.print_causes(exc)
        return 1
    except EXIT_ERRORS as exc:
        return exc.exit_code
    except ABORT_ERRORS:
        err_console.print("[red]aborted[/]")
        return 130
    except USAGE_ERRORS as exc:
        exc.show()
        return exc.exit_code


def _set_log_level(args: list[str]) -> None:
    """``--debug`` or ``--log-level LEVEL`` before the command (the root options), read before the command
    runs so that its own errors and the processes it starts use the level."""
    log.check_environment()
    index = 0
    while index < len(args) and args[index].startswith("-"):
        arg = args[index]
        if arg == "--log-level" and index + 1 < len(args):
            log.set_level(args[index + 1])
            index += 1
        elif arg.startswith("--log-level="):
            log.set_level(arg.split("=", 1)[1])
        elif arg == "--debug":
            log.set_level("debug")
        index += 1
    log.configure()


def entry() -> None:
    """The `dpokit` console script: one command in a process of its own, with dpokit's host-memory settings
    (`dpokit.host_memory`, made before torch is imported)."""
    global own_process
    own_process = True
    configure_host_memory()
    sys.exit(main())
