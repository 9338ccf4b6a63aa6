"""Benchmark: memory per rank of full fine-tuning with 1 and with 2 processes (FSDP2).

Full fine-tuning with AdamW holds, per parameter, the weight, its gradient and two optimizer
moments (16 bytes in float32). FSDP2 shards all four across ranks, so each rank of a 2-process run
should hold about half of that, plus one gathered layer at a time. Both runs use the same global
batch (per-device batch x processes) on the same model and data; each runs `dpokit train` in its
own processes, on CPU with gloo here (NCCL on CUDA), with a reference-free loss (SimPO) so that only the
policy's memory counts. Peak memory is rank 0's peak resident set size as the recipe logs it
(`peak_memory_mb` in metrics.jsonl), which includes loading the model.

    python bench/fsdp_memory_bench.py                 # ~160M parameters, appends to bench/fsdp_memory_results.md
    python bench/fsdp_memory_bench.py --layers 2      # quicker
    python bench/fsdp_memory_bench.py --quick         # a tiny model, 1 step (the 2 workers still start): checks that it runs
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import harness


def run_train(workdir: Path, processes: int, args) -> dict:
    run_dir = workdir / f"run_{processes}"
    overrides = [
        f"model.path={workdir / 'model'}",
        f"data.path={workdir / 'prepared'}",
        f"output.dir={run_dir}",
        "model.method=full",
        "loss.name=simpo",
        f"training.max_steps={args.steps}",
        "training.eval_every=0",
        f"data.batch_size={args.global_batch // processes}",
        "output.overwrite=true",
    ]
    started = time.perf_counter()
    harness.dpokit_train(overrides, args.quick, gpus=processes)
    train = harness.train_records(run_dir)
    return {
        "processes": processes,
        "peak_mb": max(r["peak_memory_mb"] for r in train),
        "seconds": time.perf_counter() - started,
        "loss": train[-1]["loss"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence (prompt + completion)")
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = harness.arguments(
        parser,
        __file__,
        argv,
        quick=dict(layers=2, hidden=64, vocab=1000, length=32, steps=1),
        quick_help="a tiny model, 1 step, the 1-process run in this process and the 2 workers as "
        "processes: checks that the script runs",
    )

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        params = harness.llama(workdir / "model", args.vocab, args.hidden, args.layers)
        half = args.length // 2
        harness.write_rows(
            workdir / "prepared", harness.random_pairs(args.global_batch * args.steps, args.vocab, half, half, half)
        )
        results = [run_train(workdir, n, args) for n in (1, 2)]

    base = results[0]["peak_mb"]
    rows = [
        (
            r["processes"],
            args.global_batch // r["processes"],
            f"{r['peak_mb']:.0f}",
            f"{r['peak_mb'] / base:.2f}x",
            f"{r['seconds']:.0f}",
            f"{r['loss']:.4f}",
        )
        for r in results
    ]
    body = [
        f"Llama-style, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: {params / 1e6:.0f}M parameters; "
        f"weights + gradients + AdamW state = {params * 16 / 2**20:.0f} MB in float32. {args.steps} steps of "
        f"{args.global_batch} pairs of {args.length} tokens a sequence.",
        "",
        *harness.table(
            ["processes", "per-device batch", "peak RSS per rank (MB)", "vs 1 process", "wall time (s)", "last loss"],
            rows,
            "rrrrrr",
        ),
    ]
    harness.publish("FSDP2 memory per rank, 1 vs 2 processes", body, args)


if __name__ == "__main__":
    main()
