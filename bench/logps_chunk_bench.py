"""The vocabulary projection's forward + backward (`dpokit.logps.completion_logps`), chunked by positions or by a
byte budget, checkpointed or fused (`dpokit.logps.FusedChunkLogps`): milliseconds and page faults per batch.

The basis of `dpokit.logps.CHUNK_BYTES` (32 MiB of float32 logits per chunk on CPU). The workload is the head of
bench/train_results.md's model (hidden 256, vocabulary 32,000, untied, float32) on the completion tokens of one
batch: about 700 for short pairs and 1,500 for long ones. A logit transform (the identity) sends the projection
down the checkpointed path, as a soft-capped or LoRA-wrapped head would go.

    python bench/logps_chunk_bench.py                 # appends a dated section to bench/logps_chunk_results.md
    python bench/logps_chunk_bench.py --quick         # a 64 x 1,000 head, one repetition: checks that it runs
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import harness
import torch

from dpokit.data.collate import collate_pairs
from dpokit.logps import completion_logps


def batch_of(tokens: int, vocab: int):
    """A packed batch whose completions hold about `tokens` tokens (pairs of a 10-token prompt, 50 + 50)."""
    rows = harness.random_pairs(max(1, tokens // 100), vocab, 10, 50, 50)
    return collate_pairs(rows, list(range(len(rows))), 0, packing=True, prefix_sharing=True)


def measure(hidden_size: int, vocab: int, tokens: int, positions: int, fused: bool, reps: int) -> tuple[float, float]:
    """Median seconds and minor page faults of a forward + backward through the projection."""
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    batch = batch_of(tokens, vocab)
    hidden = torch.randn(*batch.input_ids.shape, hidden_size, requires_grad=True)  # [R, L, H]
    transform = None if fused else (lambda logits: logits)  # any transform takes the checkpointed path

    def run() -> None:
        completion_logps(head, hidden, batch, chunk_size=positions, transform=transform).logps.sum().backward()

    run()  # warm-up
    seconds, faults = [], []
    for _ in range(reps):
        head.zero_grad()
        hidden.grad = None
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(seconds), statistics.median(faults)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7, help="timed passes per cell (median reported)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32_000)
    args = harness.arguments(parser, __file__, argv, quick=dict(reps=1, hidden=64, vocab=1000))
    torch.set_num_threads(args.threads)

    def positions(mib: int) -> int:
        return (mib << 20) // (4 * args.vocab)

    variants = [("checkpointed, 1024 positions (before)", 1024, False)]
    variants += [(f"checkpointed, {mib} MiB ({positions(mib)} positions)", positions(mib), False) for mib in (8, 32)]
    variants += [("fused, 1024 positions", 1024, True)]
    variants += [(f"fused, {mib} MiB ({positions(mib)} positions)", positions(mib), True) for mib in (4, 8, 16, 32, 64)]
    rows, baseline = [], {}
    for name, chunk, fused in variants:
        cells = [name]
        for tokens in (700, 1500):
            seconds, faults = measure(args.hidden, args.vocab, tokens, chunk, fused, args.reps)
            baseline.setdefault(tokens, seconds)
            cells += [f"{1000 * seconds:.0f} ({baseline[tokens] / seconds:.2f}x)", f"{faults:,.0f}"]
        rows.append(cells)
        print(f"{name}: {cells[1:]}", file=sys.stderr, flush=True)
    body = [
        f"Head {args.hidden} x {args.vocab:,}, {args.threads} thread(s), median of {args.reps}; milliseconds per forward + "
        "backward (speed-up against the first row), minor page faults per pass.",
        "",
        *harness.table(
            ["variant", "short batch (700 tokens): ms", "page faults", "long batch (1,500 tokens): ms", "page faults"],
            rows,
            "lrrrr",
        ),
    ]
    harness.publish("the projection's chunks", body, args)


if __name__ == "__main__":
    main()
