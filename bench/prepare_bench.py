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
    parser.add_argument("--prompt-words", type=int, default=60)
    parser.add_argument("--response-words", type=int, default=125)
    args = parser.parse_args()

    # Import the heavy libraries before any timing, so that no in-process run pays for them.
    import datasets
    from transformers import AutoTokenizer  # noqa: F401  (the lazy import that pulls in torch)

    datasets.disable_progress_bars()

    work = Path(tempfile.mkdtemp(prefix="dpokit-prepare-bench-"))
    try:
        model = args.model or str(work / "tokenizer")
        if args.model is None:
            tiny.build_tokenizer(Path(model), chat_template=True)
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
