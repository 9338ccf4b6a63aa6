"""Benchmark the reference cache writer alone: rows/s that rank 0 can commit to ``ref.h5``, no model.

    python bench/ref_writer_bench.py                                  # 1,000,000 rows, both layouts
    python bench/ref_writer_bench.py --rows 100000 --commit-rows 8 --seconds 10

The pass (`dpokit.reference.compute`) commits rows in the order it computes them: sorted by length,
so their example indices are scattered over the split. Each run here creates a cache of ``--rows``
rows (plain, or ``--per-token`` with random completion lengths averaging ``--completion-tokens``
tokens a side), then commits a random permutation of the rows ``--commit-rows`` at a time through
`RefCacheWriter.write` with synthetic values, and reports rows/s over the time spent in `write`
(the values are made outside it). A run stops after ``--seconds`` of writing (the rate of a commit
does not change as the file fills), then checks that exactly the written rows are done.

Each run is a fresh process, for this tree's writer and for a git revision's (``--baseline``,
default ``HEAD``, unpacked with ``git archive``), so before and after are measured on the same
machine in the same run. `bench/ref_writer_results.md` records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_bench import ROOT, cpu_model, unpacked_revision  # noqa: E402

# One timed run: argv = dpokit's parent directory, cache path, rows, per_token (0/1), rows per commit,
# seconds, mean completion tokens. Prints rows written, seconds in `write`, and the check.
WRITER_CHILD = """
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import dpokit
assert dpokit.__file__.startswith(sys.argv[1]), dpokit.__file__
from dpokit.reference.cache import RefCacheWriter, cache_attrs, create_or_resume_cache, open_cache

path, rows, per_token, commit_rows, limit, mean_tokens = sys.argv[2], *map(int, sys.argv[3:6]), float(sys.argv[6]), int(sys.argv[7])
rng = np.random.default_rng(0)
tokens = rng.integers(1, 2 * mean_tokens, size=(rows, 2)).astype(np.int32)  # chosen, rejected
attrs = cache_attrs(model="m", weights="w" * 64, adapter=None, adapter_weights=None, prepared_path="p",
                    data_fingerprint="d" * 64, tokenizer_fingerprint="t" * 64, dtype="float32", per_token=bool(per_token))
started = time.perf_counter()
create_or_resume_cache(path, attrs, {"train": rows}, True, {"train": tokens.sum(1)} if per_token else None)
create_seconds = time.perf_counter() - started

order = rng.permutation(rows)  # the pass's length order: scattered example indices
writer, seconds, written = RefCacheWriter(path), 0.0, 0
for start in range(0, rows, commit_rows):
    index = order[start : start + commit_rows]
    logps = -index.astype(np.float32)
    token_logps = [np.full(tokens[i].sum(), -0.5, np.float32) for i in index] if per_token else None
    started = time.perf_counter()
    writer.write("train", index, logps, 2 * logps, tokens[index, 0], tokens[index, 1], token_logps)
    seconds += time.perf_counter() - started
    written += len(index)
    if seconds >= limit:
        break
cache = open_cache(path)
values = cache.logps("train", require_done=False)
done = order[:written]
ok = (cache.rows_done["train"] == written and bool(np.all(values.chosen_logps.numpy()[done] == -done))
      and (not per_token or bool(np.all(values.token_logps.numpy()[values.token_offsets.numpy()[done[0]]] == -0.5))))
print(json.dumps({"written": written, "seconds": seconds, "create_seconds": create_seconds, "ok": ok}))
"""


def timed_writes(code: Path, work: Path, rows: int, per_token: bool, commit_rows: int, seconds: float, tokens: int) -> dict:
    """One run of `WRITER_CHILD` with the package under `code`, into a cache in a scratch folder of its own under
    `work` (gone after the run: an earlier run's cache of the same inputs would be resumed, not rewritten)."""
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        command = [sys.executable, "-c", WRITER_CHILD, str(code), str(Path(scratch) / "ref.h5"), str(rows),
                   str(int(per_token)), str(commit_rows), str(seconds), str(tokens)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    if not result["ok"]:
        raise SystemExit(f"the writer from {code} left rows that do not match what it was given")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--commit-rows", type=int, nargs="+", default=[8, 64, 512],
                        help="Rows per write: batch size x processes whose batches one write commits.")
    parser.add_argument("--layouts", nargs="+", default=["plain", "per-token"], choices=["plain", "per-token"])
    parser.add_argument("--completion-tokens", type=int, default=48, help="Mean tokens of a completion (--per-token).")
    parser.add_argument("--seconds", type=float, default=30.0, help="Stop a run after this long in `write`.")
    parser.add_argument("--baseline", default="HEAD", help="The git revision measured as 'before'.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dpokit-ref-writer-bench-") as tmp:
        run_all(args, Path(tmp))


def run_all(args, work: Path) -> None:
    codes = {f"{args.baseline} (before)": unpacked_revision(args.baseline, work / "baseline"), "this tree (after)": ROOT}
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}; {args.rows:,} rows, completions of {args.completion_tokens} tokens "
          f"on average (per-token)")
    print()
    print("| layout | rows per commit | code | rows written | seconds in write | rows/s | ms per commit | time for all rows |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for layout in args.layouts:
        for commit_rows in args.commit_rows:
            for name, code in codes.items():
                result = timed_writes(code, work, args.rows, layout == "per-token", commit_rows, args.seconds,
                                      args.completion_tokens)
                rate = result["written"] / result["seconds"]
                commits = -(-result["written"] // commit_rows)
                print(f"| {layout} | {commit_rows} | {name} | {result['written']:,} | {result['seconds']:.1f} | {rate:,.0f} | "
                      f"{1000 * result['seconds'] / commits:.2f} | {args.rows / rate:,.0f} s |", flush=True)


if __name__ == "__main__":
    main()
