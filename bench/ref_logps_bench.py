"""Benchmark: the reference pass (`dpokit ref-logps`) against the plain way of computing reference log-probs.

The plain way is what a DPO script does without dpokit: batches in dataset order, padded to the
longest row, one HF forward returning full logits, ``logits.float().log_softmax(-1)``, gather, mask,
sum. dpokit's pass sorts rows by length before batching, projects to the vocabulary only at
completion positions, chunk by chunk, and writes the HDF5 cache as it goes.

Both run the same randomly initialised Llama-style model (32k vocabulary) over the same synthetic
pairs with realistic length spread, at the same batch size, each in its own process so that peak
memory is its own. Throughput is real (non-padding) tokens per second of the pass; peak memory is the
growth of the process's peak resident set (``VmHWM``, reset just before the pass) over its size then.

    python bench/ref_logps_bench.py                        # appends a dated section to bench/ref_logps_results.md
    python bench/ref_logps_bench.py --pairs 32 --layers 2  # quicker
    python bench/ref_logps_bench.py --quick                # 4 pairs, a tiny model, in this process: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import harness
import numpy as np


def run_dpokit(workdir: Path, batch_size: int) -> dict:
    """The real pass (`compute_reference_cache`), timed by its own report; logps read back from ref.h5."""
    from dpokit.reference.cache import open_cache
    from dpokit.reference.compute import compute_reference_cache

    options = harness.reference_options(workdir, batch_size)
    start = harness.reset_peak()
    (report,) = compute_reference_cache(options)
    growth = (harness.status_kib("VmHWM") - start) * 1024
    logps = open_cache(workdir / "ref.h5").logps("train")
    return {
        "seconds": report.seconds,
        "tokens": report.tokens,
        "peak_growth": growth,
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
    start = harness.reset_peak()
    started = time.perf_counter()
    for first in range(0, len(dataset), batch_size):
        index = list(range(first, min(first + batch_size, len(dataset))))
        batch = pad_pairs([dataset[i] for i in index], index, pad_id=0)
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
            token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
            logps = (token_logps * batch.completion_mask[:, 1:]).sum(-1)
        chosen_logps += logps[: len(index)].tolist()
        tokens += batch.num_tokens
    seconds = time.perf_counter() - started
    growth = (harness.status_kib("VmHWM") - start) * 1024
    return {"seconds": seconds, "tokens": tokens, "peak_growth": growth, "chosen_logps": chosen_logps}


RUNNERS = {"plain": run_plain, "dpokit": run_dpokit}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the fastest is reported")
    parser.add_argument("--run", choices=list(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = harness.arguments(
        parser, __file__, argv, quick=dict(pairs=4, vocab=1000, hidden=64, layers=1, repeats=1, threads=1)
    )

    import torch

    torch.set_num_threads(args.threads)
    if args.run:  # a child: one measurement, printed as JSON on the last line
        print(json.dumps(RUNNERS[args.run](args.workdir, args.batch_size)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        harness.llama(workdir / "model", args.vocab, args.hidden, args.layers)
        harness.write_rows(workdir / "prepared", harness.reference_pass_rows(args.pairs, args.vocab))
        runs = {"plain": [], "dpokit": []}
        for _ in range(args.repeats):  # interleaved, so a busy spell on the machine hits both methods
            for method, method_runs in runs.items():
                child = [
                    "--run",
                    method,
                    "--workdir",
                    str(workdir),
                    "--batch-size",
                    str(args.batch_size),
                    "--threads",
                    str(args.threads),
                ]
                method_runs.append(
                    harness.measured(
                        lambda method=method: RUNNERS[method](workdir, args.batch_size),
                        __file__,
                        child,
                        args.quick,
                        env=env,
                    )
                )
    results = {}
    for method, method_runs in runs.items():
        results[method] = min(method_runs, key=lambda r: r["seconds"])
        results[method]["peak_growth"] = max(r["peak_growth"] for r in method_runs)
    plain, dpokit = results["plain"], results["dpokit"]
    difference = float(np.abs(np.array(plain["chosen_logps"]) - np.array(dpokit["chosen_logps"])).max())
    rows = [
        (name, f"{r['seconds']:.1f}", f"{r['tokens'] / r['seconds']:,.0f}", f"{r['peak_growth'] / 2**20:,.0f} MiB")
        for name, r in (("plain HF forward, full logits, unsorted", plain), ("dpokit ref-logps pass", dpokit))
    ]
    body = [
        f"Llama, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; {args.pairs} pairs, batch size "
        f"{args.batch_size}, {args.threads} torch threads; {plain['tokens']:,} real tokens; {args.repeats} run(s) per "
        "method, interleaved: the fastest time, the largest memory growth.",
        "",
        *harness.table(["method", "seconds", "tokens/s", "peak RSS growth during the pass"], rows, "lrrr"),
        "",
        f"Throughput {plain['seconds'] / dpokit['seconds']:.2f}x the plain loop; peak memory "
        f"{dpokit['peak_growth'] / max(plain['peak_growth'], 1):.1%} of its; max |dlogp| between them {difference:.2e}.",
    ]
    harness.publish("the reference pass against the plain loop", body, args)


if __name__ == "__main__":
    main()
