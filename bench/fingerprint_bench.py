"""Benchmark: the cost of `weights_fingerprint` (every byte of every weight file hashed) on a ~1 GB checkpoint.

Builds a Llama-style checkpoint of about 1 GB (float32 safetensors, random init, plus its config.json)
in a temporary directory, then times:

- ``weights_fingerprint`` with the files evicted from the page cache first (``fsync`` then
  ``posix_fadvise(DONTNEED)``, which needs no root): the read comes from the disk;
- ``weights_fingerprint`` with the files in the page cache, best of ``--repeats``;
- only reading the files (no hashing), warm, best of ``--repeats``: what of the time is I/O;
- the fingerprint it replaced (safetensors headers plus a strided sample of every tensor), warm,
  reproduced inline for comparison;
- the reference pass itself (``compute_reference_cache``, what ``dpokit ref-logps`` runs) over
  ``--pass-pairs`` synthetic pairs on the same checkpoint, to put the hash next to the work it guards.

The basis of `dpokit.fingerprint.weights_fingerprint`'s cost (bench/fingerprint_results.md). The temporary
directory is deleted at the end.

    python bench/fingerprint_bench.py                  # ~1 GB checkpoint, 3 repeats, a pass over 8 pairs
    python bench/fingerprint_bench.py --pass-pairs 0   # the hash timings only
    python bench/fingerprint_bench.py --quick          # a 1 MB checkpoint, a pass over 2 pairs: checks that it runs
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import tempfile
import time
from pathlib import Path

import harness


def evict_from_page_cache(directory: Path) -> None:
    for path in directory.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_only(directory: Path, block: int = 16 << 20) -> int:
    """Read every weight file through one buffer without hashing; bytes read."""
    buffer, total = bytearray(block), 0
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb", buffering=0) as handle:
            while read := handle.readinto(buffer):
                total += read
    return total


def old_sampled_fingerprint(directory: Path) -> str:
    """The fingerprint before issue 10: config, then per tensor its name, dtype, shape and a strided sample
    (the config's bytes as they are, where it hashed them canonicalised: the same cost)."""
    import torch
    from safetensors import safe_open

    def sample_steps(shape: list[int], budget: int = 1 << 16) -> list[int]:
        steps = []
        for dim in reversed(shape):
            take = max(1, min(dim, budget))
            steps.append(math.ceil(dim / take))
            budget = max(1, budget // math.ceil(dim / steps[-1]))
        steps.reverse()
        if shape and shape[0] > 0:
            steps[0] = min(steps[0], math.ceil(shape[0] / min(shape[0], 8)))
        return steps

    digest = hashlib.sha256()
    for name in ("config.json", "adapter_config.json"):
        if (directory / name).is_file():
            digest.update(name.encode())
            digest.update((directory / name).read_bytes())
    for path in sorted(directory.glob("*.safetensors")):
        digest.update(path.name.encode())
        with safe_open(str(path), framework="pt") as handle:
            for name in sorted(handle.keys()):
                tensor_slice = handle.get_slice(name)
                shape = list(tensor_slice.get_shape())
                digest.update(f"{name}|{tensor_slice.get_dtype()}|{shape}".encode())
                sample = tensor_slice[tuple(slice(None, None, s) for s in sample_steps(shape))]
                digest.update(sample.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run_pass(workdir: Path, batch_size: int) -> tuple[float, float, int]:
    """(seconds of the whole call, seconds of the pass as it reports them, tokens) for one ref-logps run."""
    from dpokit.reference.compute import compute_reference_cache

    options = harness.reference_options(workdir, batch_size)
    start = time.perf_counter()
    (report,) = compute_reference_cache(options)
    return time.perf_counter() - start, report.seconds, report.tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument(
        "--layers", type=int, default=16, help="16 layers of hidden 1024, vocab 32000: ~1.0 GB in float32"
    )
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pass-pairs", type=int, default=8, help="pairs for the reference pass; 0 skips it")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the pass")
    args = harness.arguments(
        parser, __file__, argv, quick=dict(hidden=64, layers=2, vocab=1000, repeats=1, pass_pairs=2, threads=1)
    )

    import torch

    from dpokit.fingerprint import weights_fingerprint

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = workdir / "model"
        harness.llama(model, args.vocab, args.hidden, args.layers)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))

        evict_from_page_cache(model)
        cold = timed(weights_fingerprint, model)
        warm = min(timed(weights_fingerprint, model) for _ in range(args.repeats))
        read = min(timed(read_only, model) for _ in range(args.repeats))
        old = min(timed(old_sampled_fingerprint, model) for _ in range(args.repeats))
        rows = [
            ("`weights_fingerprint`, files evicted from the page cache (1 run)", cold),
            (f"`weights_fingerprint`, page cache warm (best of {args.repeats})", warm),
            (f"read only, no hashing, warm (best of {args.repeats})", read),
            (f"old sampled fingerprint, warm (best of {args.repeats})", old),
        ]
        body = [
            f"Checkpoint: {size:,} bytes of float32 safetensors (Llama, {args.layers} layers, hidden {args.hidden}, "
            f"vocab {args.vocab}).",
            "",
            *harness.table(
                ["what", "seconds", "GB/s"], [(name, f"{s:.3f}", f"{size / 1e9 / s:.2f}") for name, s in rows], "lrr"
            ),
        ]
        if args.pass_pairs:
            harness.write_rows(workdir / "prepared", harness.reference_pass_rows(args.pass_pairs, args.vocab))
            total, pass_seconds, tokens = run_pass(workdir, args.batch_size)
            per_pair = pass_seconds / args.pass_pairs
            body += [
                "",
                f"The reference pass on the same checkpoint ({args.pass_pairs} pairs, {tokens:,} tokens, batch size "
                f"{args.batch_size}, {args.threads} torch threads, float32):",
                "",
                *harness.table(
                    ["what", "seconds"],
                    [
                        ("ref-logps pass (as it reports it)", f"{pass_seconds:.1f}"),
                        ("per pair", f"{per_pair:.2f}"),
                        ("whole `compute_reference_cache` call (load, fingerprint, pass, writes)", f"{total:.1f}"),
                    ],
                    "lr",
                ),
                "",
                f"Warm fingerprint = {warm / pass_seconds:.1%} of the pass over {args.pass_pairs} pairs, the pass time of "
                f"{warm / per_pair:.2f} pairs (from disk: {cold / per_pair:.2f}).",
            ]
    harness.publish("weights_fingerprint", body, args)


if __name__ == "__main__":
    main()
