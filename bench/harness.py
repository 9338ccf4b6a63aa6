"""What every benchmark in bench/ shares (a module, not a benchmark): the dated header a run records, its
results file, child processes and peak memory, and the seeded models and synthetic pairs the benchmarks build
(from a config, nothing downloaded).

A benchmark script imports this module (bench/ is ``sys.path[0]`` when the script runs) and no other script.
Torch and transformers are imported inside the functions that need them: a child process may have to set its
environment first (`dpokit.host_memory`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
QUICK_HELP = "a tiny configuration in seconds on CPU, every measurement in this process: checks that the script runs"


# ---------------------------------------------------------------------------------------------
# The record of a run: date, machine, versions, command


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def machine() -> str:
    """``AMD EPYC, 2 cores, CPU only`` (or the GPU's name)."""
    import torch

    device = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only"
    return f"{cpu_model()}, {os.cpu_count()} cores, {device}"


def installed(package: str) -> str:
    """`package`'s installed version, or ``not installed`` (trl comes with the ``bench`` extra only)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that reproduces this run, from the repository root."""
    return shlex.join(["python", f"bench/{Path(script).name}", *argv])


def run_header(title: str, command: str) -> list[str]:
    """A run's dated heading and its one-row table: date, machine, torch, transformers, command."""
    today = datetime.date.today().isoformat()
    return [
        f"## {today}: {title}",
        "",
        "| date | machine | torch | transformers | command |",
        "|---|---|---|---|---|",
        f"| {today} | {machine()} | {installed('torch')} | {installed('transformers')} | `{command}` |",
        "",
    ]


def table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> list[str]:
    """A Markdown table; ``align[i] == "r"`` right-aligns column ``i`` (numbers)."""
    rules = ["---:" if align[i : i + 1] == "r" else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rules) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def arguments(
    parser: argparse.ArgumentParser,
    script: str,
    argv: Optional[Sequence[str]],
    quick: dict,
    quick_help: str = QUICK_HELP,
) -> argparse.Namespace:
    """Add ``--quick`` and ``--out`` to `parser` and parse `argv` (default: the command line); with ``--quick``,
    `quick`'s values replace those arguments. The namespace also holds ``command``, the run's command line, and
    ``results``, where its section goes: ``--out``, else bench/<name>_results.md, nowhere for a quick run."""
    name = Path(script).stem.removesuffix("_bench")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, help=f"results file to append to (default bench/{name}_results.md)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(quick)
    args.command = command_line(script, argv)
    args.results = (
        args.out if args.out is not None or args.quick else Path(script).resolve().parent / f"{name}_results.md"
    )
    return args


def publish(title: str, body: list[str], args: argparse.Namespace) -> str:
    """Print a run's section (`run_header` + `body`) and append it to ``args.results``, if any."""
    text = "\n".join(run_header(title, args.command) + body) + "\n"
    print(text, flush=True)
    if args.results is not None:
        previous = args.results.read_text() if args.results.exists() else ""
        args.results.write_text(previous + ("\n" if previous else "") + text)
        print(f"appended to {args.results}", flush=True)
    return text


# ---------------------------------------------------------------------------------------------
# Processes and memory


def run_child(script: str, argv: Sequence[str], env: Optional[dict] = None, timeout: Optional[float] = None) -> dict:
    """Run `script` with `argv` in a fresh interpreter; its last stdout line is a JSON result."""
    process = subprocess.run([sys.executable, script, *argv], env=env, capture_output=True, text=True, timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"child {shlex.join(argv)} failed:\n{process.stderr[-4000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def measured(child: Callable[[], dict], script: str, argv: Sequence[str], quick: bool, **kwargs) -> dict:
    """`child()` in this process (--quick), else `script argv` in a fresh one (its own peak memory)."""
    return child() if quick else run_child(script, argv, **kwargs)


def dpokit_train(
    overrides: Sequence[str], quick: bool, gpus: int = 1, config: str = "tiny_lora", env: Optional[dict] = None
) -> None:
    """`dpokit train --config CONFIG --gpus N OVERRIDES`: the command in a fresh process, or with --quick the same
    recipe through `dpokit.launch.run_recipe` in this one (`gpus` > 1 still starts that many workers)."""
    argv = ["--config", config, *overrides]
    if quick:
        from dpokit.launch import run_recipe

        run_recipe(None, argv, gpus)
        return
    command = [sys.executable, "-m", "dpokit", "train", "--gpus", str(gpus), *argv]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)


def train_records(run_dir: Path) -> list[dict]:
    """The training steps' records of a run's ``metrics.jsonl``, in order."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train"]


def reference_options(workdir: Path, batch_size: int):
    """The options of a float32 `dpokit ref-logps` pass over ``workdir``'s prepared/ and model/ into ref.h5."""
    from dpokit.reference.compute import RefLogpsOptions

    return RefLogpsOptions(
        prepared=str(workdir / "prepared"),
        model=str(workdir / "model"),
        out=str(workdir / "ref.h5"),
        batch_size=batch_size,
        dtype="fp32",
        overwrite=True,
    )


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (`ru_maxrss`, which Linux reports in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_kib(key: str) -> int:
    """A field of /proc/self/status in KiB: ``VmRSS`` (resident now) or ``VmHWM`` (peak since `reset_peak`)."""
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak() -> int:
    """Reset this process's peak resident set to what it holds now (``5 > /proc/self/clear_refs``); KiB held."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("VmRSS")


def unpacked_revision(revision: str, into: Path) -> Path:
    """The `dpokit` package as it is at git `revision`, unpacked under `into` (the working tree is not touched)."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "dpokit"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


# ---------------------------------------------------------------------------------------------
# Models and data


def llama(out: Path, vocab: int, hidden: int, layers: int, tokenizer=None, **config) -> int:
    """A seeded Llama-style causal LM (untied head, GQA with heads of 64, gated MLP of 8/3 x hidden) saved in `out`,
    with `tokenizer` (a `PreTrainedTokenizerFast`) or a word-level one over the ids; returns the parameter count.
    `config` overrides any `LlamaConfig` field."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = tokenizer or word_tokenizer(vocab)
    settings = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(LlamaConfig(**(settings | config)))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def word_tokenizer(vocab: int):
    """A word-level tokenizer whose ids 2..vocab-1 are the words ``t2``, ``t3``, ...: enough for prepared ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<pad>")), pad_token="<pad>", eos_token="<eos>"
    )


def random_pairs(pairs: int, vocab: int, prompt, chosen, rejected, seed: int = 0) -> list[dict]:
    """Prepared rows of random token ids; each length is an int or an array of `pairs` ints."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def lengths(n) -> list[int]:
        return [int(n)] * pairs if np.isscalar(n) else [int(x) for x in n]

    return [
        {
            "prompt_ids": rng.integers(2, vocab, p).tolist(),
            "chosen_ids": rng.integers(2, vocab, c).tolist(),
            "rejected_ids": rng.integers(2, vocab, r).tolist(),
        }
        for p, c, r in zip(lengths(prompt), lengths(chosen), lengths(rejected))
    ]


def lognormal_lengths(pairs: int, median: float, low: int, high: int, sigma: float = 0.7, seed: int = 0):
    """`pairs` token counts drawn log-normally around `median`, clipped to [`low`, `high`]."""
    import numpy as np

    return np.clip(np.random.default_rng(seed).lognormal(np.log(median), sigma, pairs), low, high).astype(int)


def reference_pass_rows(pairs: int, vocab: int) -> list[dict]:
    """Pairs with a realistic length spread for the reference pass: prompts of about 150 tokens (16-512),
    completions of about 200 (8-512)."""
    return random_pairs(
        pairs,
        vocab,
        lognormal_lengths(pairs, 150, 16, 512, seed=1),
        lognormal_lengths(pairs, 200, 8, 512, seed=2),
        lognormal_lengths(pairs, 200, 8, 512, seed=3),
    )


def write_rows(out: Path, rows: list[dict]) -> None:
    """`rows` as a prepared directory (the train split), for the commands that read `dpokit prepare`'s output."""
    import datasets

    from dpokit.data.prepared import write_prepared

    manifest = {
        "source": "bench",
        "splits": {"train": {"rows": len(rows)}},
        "tokenizer": {"name": "bench", "fingerprint": "bench"},
    }
    write_prepared(out, {"train": datasets.Dataset.from_list(rows)}, manifest, overwrite=True)
