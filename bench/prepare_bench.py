"""Benchmark `dpokit prepare` on generated pairs against the plain per-row way of doing the same work.

    python bench/prepare_bench.py                      # 10,000 pairs, tiny offline tokenizer
    python bench/prepare_bench.py --model DIR --rows 20000
    python bench/prepare_bench.py --quick              # 40 pairs, in this process: checks that it runs

Each pair is about 300 tokens (prompt about 100, each response about 200) with the tokenizer used.
Timings, each of the whole job from rows on disk to a written prepared/ directory:

* ``plain loop``: per row, ``apply_chat_template(..., tokenize=True)`` for the prompt and both full
  conversations, slice the completions, then `Dataset.from_list` and `save_to_disk` (what a user
  would write by hand);
* ``dpokit prepare`` in this process, ``--num-proc 1`` and ``--num-proc 2``;
* ``dpokit prepare`` as a command (a new interpreter, imports included), ``--num-proc 2``.

Memory mode: peak resident memory of `dpokit prepare` as the number of pairs grows, this tree's code
against a git revision's (``--baseline``, default ``HEAD``, unpacked with ``git archive``; ``''`` for
none), each run in a fresh process. The process imports everything and loads the tokenizer, resets its
peak (``5 > /proc/self/clear_refs``), runs `run_prepare` and reports its peak during the run (``VmHWM``);
the parent also reads the process's peak with ``os.wait4`` (imports included, and its workers'):

    python bench/prepare_bench.py --memory                          # 2,000 and 200,000 short pairs
    python bench/prepare_bench.py --memory --memory-rows 2000 20000 --prompt-words 60 --response-words 125
    python bench/prepare_bench.py --memory --quick                  # 50 and 200 pairs, this tree, in this process

Both revisions must give the same data fingerprint on the same input (checked). Both modes append a dated
section to bench/prepare_results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

sys.path.insert(0, str(harness.ROOT / "tests"))
import tiny  # noqa: E402  (the offline tokenizer and word list every test uses)


def generated_rows(count: int, prompt_words: int, response_words: int, seed: int = 0) -> list[dict]:
    """Plain-format pairs of random words from the tiny tokenizer's vocabulary."""
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(tiny.WORDS) for _ in range(words)) + "."

    return [
        {"prompt": text(prompt_words), "chosen": text(response_words), "rejected": text(response_words)}
        for _ in range(count)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def plain_loop(rows: list[dict], model: str, out: Path) -> None:
    """The hand-written baseline: one `apply_chat_template` call per sequence, then save."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prepared = []
    for row in rows:
        messages = [{"role": "user", "content": row["prompt"]}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        entry = {"prompt_ids": prompt}
        for side in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": row[side]}], tokenize=True
            )["input_ids"]
            entry[f"{side}_ids"] = full[len(prompt) :]
        prepared.append(entry)
    datasets.Dataset.from_list(prepared).save_to_disk(str(out / "train"))


def dpokit_in_process(data: Path, model: str, out: Path, num_proc: int, eval_fraction: float = 0.0) -> dict:
    """`run_prepare` (what the command runs) with its console silenced; the manifest it wrote."""
    from rich.console import Console

    from dpokit.data.pipeline import PrepareOptions, run_prepare

    options = PrepareOptions(
        data=str(data), model=model, out=out, num_proc=num_proc, eval_fraction=eval_fraction, overwrite=True
    )  # the previous run's output: dpokit's own
    with open(os.devnull, "w") as devnull:
        run_prepare(options, console=Console(file=devnull))
    return json.loads((out / "manifest.json").read_text())


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def peak_of_prepare(data: Path, model: str, out: Path, num_proc: int, eval_fraction: float) -> dict:
    """One measured run in this process: imports and the tokenizer first (every run holds them before it reads a
    row), then the peak is reset, so ``VmHWM`` after the run is the run's own (KiB)."""
    import datasets  # noqa: F401  (the old code imports it to write, the new one to read)

    from dpokit.data.tokenize import load_tokenizer

    load_tokenizer(model)
    start = harness.reset_peak()
    started = time.perf_counter()
    manifest = dpokit_in_process(data, model, out, num_proc, eval_fraction)
    return {
        "start_kib": start,
        "peak_kib": harness.status_kib("VmHWM"),
        "seconds": time.perf_counter() - started,
        "fingerprint": manifest["data_fingerprint"],
        "lengths": manifest["lengths"],
    }


def child(argv: list[str]) -> None:
    """``--child CODE DATA MODEL OUT NUM_PROC EVAL_FRACTION``: `peak_of_prepare` with the `dpokit` under CODE."""
    code, data, model, out, num_proc, eval_fraction = argv
    sys.path.insert(0, code)
    import dpokit

    assert dpokit.__file__.startswith(code), dpokit.__file__
    print(json.dumps(peak_of_prepare(Path(data), model, Path(out), int(num_proc), float(eval_fraction))))


def measured_prepare(code: Path, data: Path, model: str, out: Path, args) -> dict:
    """`peak_of_prepare` with the package under `code` in a new process (this one with --quick); with its peak
    from ``wait4`` (imports and workers included), KiB."""
    if args.quick:
        result = peak_of_prepare(data, model, out, args.num_proc, args.eval_fraction)
        return {**result, "wait4_peak_kib": harness.peak_rss_mib() * 1024}
    command = [
        sys.executable,
        __file__,
        "--child",
        str(code),
        str(data),
        model,
        str(out),
        str(args.num_proc),
        str(args.eval_fraction),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)  # this child's peak (and its workers'), not the largest child's so far
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prepare from {code} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return {**json.loads(output.strip().splitlines()[-1]), "wait4_peak_kib": usage.ru_maxrss}


def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f} MiB"


def memory_bench(args, work: Path, model: str) -> list[str]:
    """Peak RSS and rows/s of the baseline revision and this tree, at each of ``--memory-rows``."""
    codes = {"this tree (after)": harness.ROOT}
    if args.baseline:
        codes = {f"{args.baseline} (before)": harness.unpacked_revision(args.baseline, work / "baseline"), **codes}
    data = {
        rows: write_jsonl(work / f"pairs-{rows}.jsonl", generated_rows(rows, args.prompt_words, args.response_words))
        for rows in args.memory_rows
    }
    table, fingerprints = [], {}
    for name, code in codes.items():
        first_peak = None
        for rows in args.memory_rows:
            result = measured_prepare(code, data[rows], model, work / "out", args)
            fingerprints.setdefault(rows, set()).add(result["fingerprint"])
            first_peak = first_peak or result["peak_kib"]
            table.append(
                (
                    name,
                    f"{rows:,}",
                    mib(result["start_kib"]),
                    mib(result["peak_kib"]),
                    f"{result['peak_kib'] / first_peak:.2f}x",
                    mib(result["wait4_peak_kib"]),
                    f"{result['seconds']:.1f}",
                    f"{rows / result['seconds']:,.0f}",
                )
            )
            print(" | ".join(table[-1]), file=sys.stderr, flush=True)
    if not all(len(values) == 1 for values in fingerprints.values()):
        raise SystemExit("the two revisions prepared different data")
    lengths = result["lengths"]
    return [
        f"Memory: `--num-proc {args.num_proc}`, `--eval-fraction {args.eval_fraction}`; tokens per pair (p50): prompt "
        f"{lengths['prompt']['p50']}, each completion {lengths['completion']['p50']}. Data fingerprints equal between the "
        "codes.",
        "",
        *harness.table(
            [
                "code",
                "pairs",
                "RSS at the start",
                "peak RSS during the run",
                "peak / peak at the fewest pairs",
                "peak of process and workers (wait4)",
                "seconds",
                "rows/s",
            ],
            table,
            "lrrrrrrr",
        ),
    ]


def speed_bench(args, work: Path, model: str) -> list[str]:
    """The plain loop, `dpokit prepare` in this process and as a command, on ``--rows`` pairs."""
    rows = generated_rows(args.rows, args.prompt_words, args.response_words)
    data = write_jsonl(work / "pairs.jsonl", rows)
    results = [("plain loop (apply_chat_template per row)", timed(lambda: plain_loop(rows, model, work / "plain")))]
    manifest = {}
    for num_proc in (1,) if args.quick else (1, 2):
        out = work / f"in-process-{num_proc}"
        seconds = timed(
            lambda out=out, num_proc=num_proc: manifest.update(dpokit_in_process(data, model, out, num_proc))
        )
        results.append((f"dpokit prepare, in process, --num-proc {num_proc}", seconds))
    if not args.quick:  # a new interpreter: imports included
        command = [
            sys.executable,
            "-m",
            "dpokit",
            "prepare",
            str(data),
            "--model",
            model,
            "--out",
            str(work / "command"),
            "--num-proc",
            "2",
        ]
        results.append(
            (
                "`dpokit prepare` command, --num-proc 2 (with imports)",
                timed(lambda: subprocess.run(command, check=True, stdout=subprocess.DEVNULL)),
            )
        )
    lengths = manifest["lengths"]
    return [
        f"{args.rows:,} pairs; tokens: prompt p50 {lengths['prompt']['p50']}, completion p50 "
        f"{lengths['completion']['p50']}.",
        "",
        *harness.table(
            ["run", "seconds", "rows/s"],
            [(name, f"{seconds:.1f}", f"{args.rows / seconds:,.0f}") for name, seconds in results],
            "lrr",
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--model", default=None, help="Tokenizer directory (default: build the tiny test tokenizer).")
    parser.add_argument("--prompt-words", type=int, default=None, help="Default 60, with --memory 8.")
    parser.add_argument("--response-words", type=int, default=None, help="Default 125, with --memory 4.")
    parser.add_argument("--memory", action="store_true", help="Measure peak RSS against --memory-rows pairs instead.")
    parser.add_argument("--memory-rows", type=int, nargs="+", default=[2_000, 200_000])
    parser.add_argument(
        "--baseline", default="HEAD", help="The git revision measured as 'before' (--memory; '' for none)."
    )
    parser.add_argument("--num-proc", type=int, default=1, help="--num-proc of the measured runs (--memory).")
    parser.add_argument(
        "--eval-fraction", type=float, default=0.0, help="--eval-fraction of the measured runs (--memory)."
    )
    args = harness.arguments(parser, __file__, argv, quick=dict(rows=40, memory_rows=[50, 200], baseline=""))
    short = args.memory  # short pairs with --memory, so that 200,000 of them take a minute
    args.prompt_words = args.prompt_words or (8 if short else 60)
    args.response_words = args.response_words or (4 if short else 125)

    # Import the heavy libraries before any timing, so that no in-process run pays for them.
    import datasets
    from transformers import AutoTokenizer  # noqa: F401  (the lazy import that pulls in torch)

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="dpokit-prepare-bench-"))
    try:
        model = args.model or str(work / "tokenizer")
        if args.model is None:
            tiny.build_tokenizer(Path(model), chat_template=True)
        body = memory_bench(args, work, model) if args.memory else speed_bench(args, work, model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    title = "`dpokit prepare` peak memory" if args.memory else "`dpokit prepare` against the plain loop"
    harness.publish(title, body, args)


if __name__ == "__main__":
    main()
