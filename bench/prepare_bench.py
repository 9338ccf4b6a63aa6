"""Benchmark `dpokit prepare` on generated pairs against the plain per-row way of doing the same work.

    python bench/prepare_bench.py                      # 10,000 pairs, tiny offline tokenizer
    python bench/prepare_bench.py --model DIR --rows 20000

Each pair is about 300 tokens (prompt about 100, each response about 200) with the tokenizer used.
Three timings, each of the whole job from rows on disk to a written prepared/ directory:

* ``plain loop``: per row, ``apply_chat_template(..., tokenize=True)`` for the prompt and both full
  conversations, slice the completions, then `Dataset.from_list` and `save_to_disk` (what a user
  would write by hand, and what `tests/conftest.py` does for its fixture);
* ``dpokit prepare`` in this process, ``--num-proc 1`` and ``--num-proc 2``;
* ``dpokit prepare`` as a command (a new interpreter, imports included), ``--num-proc 2``.

Results go to stdout as a Markdown table; `bench/prepare_results.md` records a run.

Memory mode: peak resident memory of `dpokit prepare` as the number of pairs grows, this tree's code
against a git revision's (``--baseline``, default ``HEAD``, unpacked with ``git archive``), each run
in a fresh process. The process imports everything and loads the tokenizer, resets its peak
(``5 > /proc/self/clear_refs``), runs `run_prepare` and reports its peak during the run (``VmHWM``);
the parent also reads the process's peak with ``os.wait4`` (imports included, and its workers'):

    python bench/prepare_bench.py --memory                          # 2,000 and 200,000 short pairs
    python bench/prepare_bench.py --memory --memory-rows 2000 20000 --prompt-words 60 --response-words 125

Both revisions must give the same data fingerprint on the same input (checked).
`bench/prepare_memory_results.md` records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import tiny  # noqa: E402


def generated_rows(count: int, prompt_words: int, response_words: int, seed: int = 0) -> list[dict]:
    """Plain-format pairs of random words from the tiny tokenizer's vocabulary."""
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(tiny.WORDS) for _ in range(words)) + "."

    return [{"prompt": text(prompt_words), "chosen": text(response_words), "rejected": text(response_words)} for _ in range(count)]


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
            full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": row[side]}], tokenize=True)["input_ids"]
            entry[f"{side}_ids"] = full[len(prompt):]
        prepared.append(entry)
    datasets.Dataset.from_list(prepared).save_to_disk(str(out / "train"))


def dpokit_in_process(data: Path, model: str, out: Path, num_proc: int) -> dict:
    from rich.console import Console

    from dpokit.data.pipeline import PrepareOptions, run_prepare

    run_prepare(
        PrepareOptions(data=str(data), model=model, out=out, max_length=1024, num_proc=num_proc),
        console=Console(file=open(os.devnull, "w")),
    )
    return json.loads((out / "manifest.json").read_text())


def dpokit_command(data: Path, model: str, out: Path, num_proc: int) -> None:
    command = [sys.executable, "-m", "dpokit", "prepare", str(data), "--model", model, "--out", str(out), "--num-proc", str(num_proc)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


# One measured `dpokit prepare` run: argv = dpokit's parent directory, data, model, out, num_proc, eval_fraction.
# Imports (datasets too: the old code imports it to write, the new one to read) and the tokenizer come first: every
# run holds them before it reads a row, and importing torch peaks higher than it settles. Then the peak is reset,
# so VmHWM after the run is the run's own. Prints the resident memory at the start, the peak, seconds, fingerprint.
MEMORY_CHILD = """
import json, os, re, sys, time
sys.path.insert(0, sys.argv[1])
import dpokit
assert dpokit.__file__.startswith(sys.argv[1]), dpokit.__file__
from rich.console import Console
from dpokit.data.pipeline import PrepareOptions, run_prepare
from dpokit.data.tokenize import load_tokenizer
import datasets  # noqa: F401

def status_kib(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

load_tokenizer(sys.argv[3])
with open("/proc/self/clear_refs", "w") as stream:
    stream.write("5")  # VmHWM := VmRSS
start = status_kib("VmRSS")
started = time.perf_counter()
options = PrepareOptions(data=sys.argv[2], model=sys.argv[3], out=sys.argv[4], num_proc=int(sys.argv[5]),
                         eval_fraction=float(sys.argv[6]), overwrite=True)  # the previous run's output: dpokit's own
out = run_prepare(options, console=Console(file=open(os.devnull, "w")))
seconds = time.perf_counter() - started
manifest = json.loads((out / "manifest.json").read_text())
print(json.dumps({"start_kib": start, "peak_kib": status_kib("VmHWM"), "seconds": seconds,
                  "fingerprint": manifest["data_fingerprint"], "lengths": manifest["lengths"]}))
"""


def measured_prepare(code: Path, data: Path, model: str, out: Path, num_proc: int, eval_fraction: float) -> dict:
    """Run `dpokit prepare` from the package under `code` in a new process; its result and peaks (KiB)."""
    command = [sys.executable, "-c", MEMORY_CHILD, str(code), str(data), model, str(out), str(num_proc), str(eval_fraction)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)  # this child's peak (and its workers'), not the largest child's so far
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"prepare from {code} failed with exit code {child.returncode}")
    return {**json.loads(output.strip().splitlines()[-1]), "wait4_peak_kib": usage.ru_maxrss}


def unpacked_revision(revision: str, into: Path) -> Path:
    """The `dpokit` package as it is at git `revision`, unpacked under `into` (the working tree is not touched)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "dpokit"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def mib(kib: int) -> str:
    return f"{kib / 1024:,.0f} MiB"


def memory_bench(args, work: Path, model: str) -> None:
    """Peak RSS and rows/s of the baseline revision and this tree, at each of ``--memory-rows``."""
    codes = {f"{args.baseline} (before)": unpacked_revision(args.baseline, work / "baseline"), "this tree (after)": ROOT}
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}; --num-proc {args.num_proc}, --eval-fraction {args.eval_fraction}")
    print()
    print("| code | pairs | RSS at the start | peak RSS during the run | peak / peak at the fewest pairs | "
          "peak of process and workers (wait4) | seconds | rows/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    fingerprints: dict[int, set] = {}
    for rows in args.memory_rows:
        data = work / f"pairs-{rows}.jsonl"
        with open(data, "w") as stream:
            for row in generated_rows(rows, args.prompt_words, args.response_words):
                stream.write(json.dumps(row) + "\n")
    for name, code in codes.items():
        first_peak = None
        for rows in args.memory_rows:
            result = measured_prepare(code, work / f"pairs-{rows}.jsonl", model, work / "out", args.num_proc, args.eval_fraction)
            fingerprints.setdefault(rows, set()).add(result["fingerprint"])
            first_peak = first_peak or result["peak_kib"]
            print(f"| {name} | {rows:,} | {mib(result['start_kib'])} | {mib(result['peak_kib'])} | "
                  f"{result['peak_kib'] / first_peak:.2f}x | {mib(result['wait4_peak_kib'])} | {result['seconds']:.1f} | "
                  f"{rows / result['seconds']:,.0f} |", flush=True)
    lengths = result["lengths"]
    print()
    print(f"tokens per pair (p50): prompt {lengths['prompt']['p50']}, each completion {lengths['completion']['p50']}")
    same = all(len(values) == 1 for values in fingerprints.values())
    print(f"data fingerprints equal between the two: {same}")
    if not same:
        raise SystemExit("the two revisions prepared different data")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--model", default=None, help="Tokenizer directory (default: build the tiny test tokenizer).")
    parser.add_argument("--prompt-words", type=int, default=None, help="Default 60, with --memory 8.")
    parser.add_argument("--response-words", type=int, default=None, help="Default 125, with --memory 4.")
    parser.add_argument("--memory", action="store_true", help="Measure peak RSS against --memory-rows pairs instead.")
    parser.add_argument("--memory-rows", type=int, nargs="+", default=[2_000, 200_000])
    parser.add_argument("--baseline", default="HEAD", help="The git revision measured as 'before' (--memory).")
    parser.add_argument("--num-proc", type=int, default=1, help="--num-proc of the measured runs (--memory).")
    parser.add_argument("--eval-fraction", type=float, default=0.0, help="--eval-fraction of the measured runs (--memory).")
    args = parser.parse_args()
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
        if args.memory:
            memory_bench(args, work, model)
            return
        data = work / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in generated_rows(args.rows, args.prompt_words, args.response_words)))

        results = [("plain loop (apply_chat_template per row)", timed(lambda: plain_loop(generated_rows(args.rows, args.prompt_words, args.response_words), model, work / "plain")))]
        manifest = {}
        for num_proc in (1, 2):
            seconds = timed(lambda: manifest.update(dpokit_in_process(data, model, work / f"in-process-{num_proc}", num_proc)))
            results.append((f"dpokit prepare, in process, --num-proc {num_proc}", seconds))
        results.append(("`dpokit prepare` command, --num-proc 2 (with imports)", timed(lambda: dpokit_command(data, model, work / "command", 2))))

        lengths = manifest["lengths"]
        print(f"machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
        print(f"rows: {args.rows}; tokens: prompt p50 {lengths['prompt']['p50']}, completion p50 {lengths['completion']['p50']}, "
              f"prompt+completion p50 {lengths['prompt']['p50'] + lengths['completion']['p50']}")
        print()
        print("| run | seconds | rows/s |")
        print("|---|---:|---:|")
        for name, seconds in results:
            print(f"| {name} | {seconds:.1f} | {args.rows / seconds:,.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
