"""The vocabulary projection's forward + backward, chunked by positions or by a byte budget, checkpointed
(recompute under autograd) or fused (`dpokit.logps.FusedChunkLogps`): time and page faults per batch.

    python bench/logps_chunk_bench.py [--threads 1] [--reps 7]

The workload is bench/RESULTS.md's model head (hidden 256, vocabulary 32,000, untied, fp32) on the completion
tokens of one batch: about 700 for short pairs and 1,500 for long ones. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from torch.utils.checkpoint import checkpoint

from dpokit.logps import FusedChunkLogps, _chunk_token_logps

HIDDEN, VOCAB = 256, 32_000


def run(head, hidden, targets, positions: int, fused: bool) -> None:
    total = 0
    for start in range(0, hidden.shape[0], positions):
        chunk, chunk_targets = hidden[start:start + positions], targets[start:start + positions]
        if fused:
            logps, _ = FusedChunkLogps.apply(chunk, head.weight, head.bias, chunk_targets)
        else:
            logps, _, _ = checkpoint(_chunk_token_logps, head, None, chunk, chunk_targets, (), use_reentrant=False)
        total = total + logps.sum()
    total.backward()


def measure(tokens: int, positions: int, fused: bool, reps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    hidden = torch.randn(tokens, HIDDEN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (tokens,))
    run(head, hidden, targets, positions, fused)  # warm-up
    seconds, faults = [], []
    for _ in range(reps):
        head.zero_grad()
        hidden.grad = None
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        run(head, hidden, targets, positions, fused)
        seconds.append(time.perf_counter() - started)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(seconds), statistics.median(faults)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [("checkpointed, 1024 positions (before)", 1024, False)]
    variants += [(f"checkpointed, {mib} MiB ({(mib << 20) // (4 * VOCAB)} positions)", (mib << 20) // (4 * VOCAB), False)
                 for mib in (8, 32)]
    variants += [("fused, 1024 positions", 1024, True)]
    variants += [(f"fused, {mib} MiB ({(mib << 20) // (4 * VOCAB)} positions)", (mib << 20) // (4 * VOCAB), True)
                 for mib in (4, 8, 16, 32, 64)]
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.reps}; head {HIDDEN} x {VOCAB}\n")
    print("| variant | short batch (700 tokens): ms | page faults | long batch (1,500 tokens): ms | page faults |")
    print("|---|---:|---:|---:|---:|")
    baseline = {}
    for name, positions, fused in variants:
        cells = []
        for tokens in (700, 1500):
            seconds, faults = measure(tokens, positions, fused, args.reps)
            baseline.setdefault(tokens, seconds)
            cells += [f"{1000 * seconds:.0f} ({baseline[tokens] / seconds:.2f}x)", f"{faults:,.0f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
