"""Benchmark: the reference pass (`dpokit ref-logps`) against the plain way of computing reference log-probs.

The plain way is what a DPO script does without dpokit: batches in dataset order, padded to the
longest row, one HF forward returning full logits, ``logits.float().log_softmax(-1)``, gather, mask,
sum. dpokit's pass sorts rows by length before batching, projects to the vocabulary only at
completion positions, chunk by chunk, and writes the HDF5 cache as it goes.

Both run the same randomly initialised Llama-style model (32k vocabulary) over the same synthetic
pairs with realistic length spread, at the same batch size, each in its own process so that peak
memory is its own. Throughput is real (non-padding) tokens per second of the pass; peak memory is the
largest resident-set growth over the process's RSS just before the pass (sampled every 5 ms).

    python bench/ref_logps_bench.py                       # defaults below, prints a markdown table
    python bench/ref_logps_bench.py --pairs 32 --layers 2  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def build_model(out: Path, vocab: int, hidden: int, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(out)


def build_prepared(out: Path, pairs: int, vocab: int, seed: int) -> None:
    """Pairs with log-normal lengths (prompt median ~150, completions ~200 tokens, total <= 1024)."""
    import datasets

    from dpokit.data.prepared import write_prepared

    rng = np.random.default_rng(seed)

    def lengths(median: float, low: int, high: int) -> np.ndarray:
        return np.clip(rng.lognormal(np.log(median), 0.7, pairs), low, high).astype(int)

    prompt, chosen, rejected = lengths(150, 16, 512), lengths(200, 8, 512), lengths(200, 8, 512)
    rows = [
        {
            "prompt_ids": rng.integers(10, vocab, p).tolist(),
            "chosen_ids": rng.integers(10, vocab, c).tolist(),
            "rejected_ids": rng.integers(10, vocab, r).tolist(),
        }
        for p, c, r in zip(prompt, chosen, rejected)
    ]
    manifest = {"source": "bench", "splits": {"train": {"rows": pairs}}, "tokenizer": {"name": "none", "fingerprint": "bench"}}
    write_prepared(out, {"train": datasets.Dataset.from_list(rows)}, manifest, overwrite=True)


class PeakRss:
    """Samples this process's resident set size in a thread; `peak_growth` is relative to the start."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.baseline = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def peak_growth(self) -> int:
        return self.peak - self.baseline


def run_dpokit(workdir: Path, batch_size: int) -> dict:
    """The real pass (`compute_reference_cache`), timed by its own report; logps read back from ref.h5."""
    from dpokit.reference.compute import RefLogpsOptions, compute_reference_cache
    from dpokit.reference.cache import open_cache

    options = RefLogpsOptions(
        prepared=str(workdir / "prepared"), model=str(workdir / "model"), out=str(workdir / "ref.h5"),
        batch_size=batch_size, dtype="fp32", overwrite=True,
    )
    with PeakRss() as memory:
        (report,) = compute_reference_cache(options)
    logps = open_cache(workdir / "ref.h5").logps("train")
    return {
        "seconds": report.seconds, "tokens": report.tokens, "peak_growth": memory.peak_growth, "peak_rss": memory.peak,
        "chosen_logps": logps.chosen_logps.tolist(),
    }


def run_plain(workdir: Path, batch_size: int) -> dict:
    """Index-order padded batches, full float32 logits and log_softmax over the whole vocabulary."""
    import torch

    from dpokit.data.collate import pad_pairs
    from dpokit.data.prepared import load_prepared
    from dpokit.model import load_reference

    model = load_reference(str(workdir / "model"), torch.float32, torch.device("cpu"))
    dataset = load_prepared(workdir / "prepared").split("train")
    chosen_logps, tokens = [], 0
    with PeakRss() as memory:
        start = time.perf_counter()
        for first in range(0, len(dataset), batch_size):
            index = list(range(first, min(first + batch_size, len(dataset))))
            batch = pad_pairs([dataset[i] for i in index], index, pad_id=0)
            with torch.no_grad():
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
                token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
                logps = (token_logps * batch.completion_mask[:, 1:]).sum(-1)
            chosen_logps += logps[: len(index)].tolist()
            tokens += batch.num_tokens
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "peak_growth": memory.peak_growth, "peak_rss": memory.peak, "chosen_logps": chosen_logps}


def measure(method: str, workdir: Path, batch_size: int, threads: int) -> dict:
    """Run one method in a fresh interpreter and return its JSON result."""
    command = [sys.executable, __file__, "--run", method, "--workdir", str(workdir), "--batch-size", str(batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the fastest is reported")
    parser.add_argument("--run", choices=["dpokit", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run:  # a child: one measurement, printed as JSON on the last line
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        runner = run_dpokit if args.run == "dpokit" else run_plain
        print(json.dumps(runner(args.workdir, args.batch_size)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        build_model(workdir / "model", args.vocab, args.hidden, args.layers)
        build_prepared(workdir / "prepared", args.pairs, args.vocab, seed=0)
        runs = {"plain": [], "dpokit": []}
        for _ in range(args.repeats):  # interleaved, so a busy spell on the machine hits both methods
            for method, method_runs in runs.items():
                method_runs.append(measure(method, workdir, args.batch_size, args.threads))
    results = {}
    for method, method_runs in runs.items():
        results[method] = min(method_runs, key=lambda r: r["seconds"])
        results[method]["peak_growth"] = max(r["peak_growth"] for r in method_runs)
    plain, dpokit = results["plain"], results["dpokit"]
    difference = float(np.abs(np.array(plain["chosen_logps"]) - np.array(dpokit["chosen_logps"])).max())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}")
    print(f"model: Llama, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; {args.pairs} pairs, "
          f"batch size {args.batch_size}; {plain['tokens']:,} real tokens\n")
    print("| method | seconds | tokens/s | peak RSS growth during the pass |")
    print("|---|---:|---:|---:|")
    for name, r in (("plain HF forward, full logits, unsorted", plain), ("dpokit ref-logps pass", dpokit)):
        print(f"| {name} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:,.0f} | {r['peak_growth'] / 2**20:,.0f} MiB |")
    speedup = plain["seconds"] / dpokit["seconds"]
    memory = dpokit["peak_growth"] / max(plain["peak_growth"], 1)
    print(f"\nthroughput {speedup:.2f}x; peak memory {memory:.1%} of plain; max |Δ logp| between them {difference:.2e}")


if __name__ == "__main__":
    main()
