"""Benchmark the reference cache writer alone: rows/s that rank 0 can commit to ``ref.h5``, no model.

    python bench/ref_writer_bench.py                                  # 1,000,000 rows, both layouts
    python bench/ref_writer_bench.py --rows 100000 --commit-rows 8 --seconds 10
    python bench/ref_writer_bench.py --quick                          # 2,000 rows, this tree only: checks that it runs

The pass (`dpokit.reference.compute`) commits rows in the order it computes them: sorted by length,
so their example indices are scattered over the split. Each run here creates a cache of ``--rows``
rows (plain, or ``--per-token`` with random completion lengths averaging ``--completion-tokens``
tokens a side), then commits a random permutation of the rows ``--commit-rows`` at a time through
`RefCacheWriter.write` with synthetic values, and reports rows/s over the time spent in `write`
(the values are made outside it). A run stops after ``--seconds`` of writing (the rate of a commit
does not change as the file fills), then checks that exactly the written rows are done.

Each run is a fresh process, for this tree's writer and for a git revision's (``--baseline``,
default ``HEAD``, unpacked with ``git archive``; ``--baseline ''`` for this tree alone), so before and
after are measured on the same machine in the same run. The basis of the commit sizes in
`dpokit.reference.cache` (bench/ref_writer_results.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import harness


def timed_writes(path: str, rows: int, per_token: bool, commit_rows: int, limit: float, mean_tokens: int) -> dict:
    """Create a cache of `rows` rows at `path` and commit a permutation of them `commit_rows` at a time for up to
    `limit` seconds of `write`, with the `dpokit` first on ``sys.path``; rows written, seconds, and the check."""
    import numpy as np

    from dpokit.reference.cache import RefCacheWriter, cache_attrs, create_or_resume_cache, open_cache

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 2 * mean_tokens, size=(rows, 2)).astype(np.int32)  # chosen, rejected
    attrs = cache_attrs(
        model="m",
        weights="w" * 64,
        adapter=None,
        adapter_weights=None,
        prepared_path="p",
        data_fingerprint="d" * 64,
        tokenizer_fingerprint="t" * 64,
        dtype="float32",
        per_token=per_token,
    )
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
    ok = (
        cache.rows_done["train"] == written
        and bool(np.all(values.chosen_logps.numpy()[done] == -done))
        and (not per_token or bool(np.all(values.token_logps.numpy()[values.token_offsets.numpy()[done[0]]] == -0.5)))
    )
    return {"written": written, "seconds": seconds, "create_seconds": create_seconds, "ok": ok}


def measure(code: Path, work: Path, args, per_token: bool, commit_rows: int) -> dict:
    """One run with the package under `code` (a fresh process; in this one with --quick), into a scratch folder of
    its own under `work` (gone after the run: an earlier run's cache of the same inputs would be resumed)."""
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        path = str(Path(scratch) / "ref.h5")
        sizes = (args.rows, per_token, commit_rows, args.seconds, args.completion_tokens)
        child = ["--child", str(code), path, *map(str, sizes)]
        result = harness.measured(lambda: timed_writes(path, *sizes), __file__, child, args.quick)
    if not result["ok"]:
        raise SystemExit(f"the writer from {code} left rows that do not match what it was given")
    return result


def child(argv: list[str]) -> None:
    """``--child CODE PATH ROWS PER_TOKEN COMMIT_ROWS SECONDS TOKENS``: one run with the `dpokit` under CODE."""
    code, path, rows, per_token, commit_rows, seconds, tokens = argv
    sys.path.insert(0, code)
    import dpokit

    assert dpokit.__file__.startswith(code), dpokit.__file__
    result = timed_writes(path, int(rows), per_token == "True", int(commit_rows), float(seconds), int(tokens))
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--commit-rows",
        type=int,
        nargs="+",
        default=[8, 64, 512],
        help="Rows per write: batch size x processes whose batches one write commits.",
    )
    parser.add_argument("--layouts", nargs="+", default=["plain", "per-token"], choices=["plain", "per-token"])
    parser.add_argument("--completion-tokens", type=int, default=48, help="Mean tokens of a completion (--per-token).")
    parser.add_argument("--seconds", type=float, default=30.0, help="Stop a run after this long in `write`.")
    parser.add_argument("--baseline", default="HEAD", help="The git revision measured as 'before' ('' for none).")
    args = harness.arguments(
        parser, __file__, argv, quick=dict(rows=2_000, commit_rows=[8, 64], seconds=0.2, baseline="")
    )

    rows = []
    with tempfile.TemporaryDirectory(prefix="dpokit-ref-writer-bench-") as tmp:
        work = Path(tmp)
        codes = {"this tree (after)": harness.ROOT}
        if args.baseline:
            codes = {f"{args.baseline} (before)": harness.unpacked_revision(args.baseline, work / "baseline"), **codes}
        for layout in args.layouts:
            for commit_rows in args.commit_rows:
                for name, code in codes.items():
                    result = measure(code, work, args, layout == "per-token", commit_rows)
                    rate = result["written"] / result["seconds"]
                    commits = -(-result["written"] // commit_rows)
                    rows.append(
                        (
                            layout,
                            commit_rows,
                            name,
                            f"{result['written']:,}",
                            f"{result['seconds']:.1f}",
                            f"{rate:,.0f}",
                            f"{1000 * result['seconds'] / commits:.2f}",
                            f"{args.rows / rate:,.0f} s",
                        )
                    )
                    print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    body = [
        f"{args.rows:,} rows; per-token completions of {args.completion_tokens} tokens on average.",
        "",
        *harness.table(
            [
                "layout",
                "rows per commit",
                "code",
                "rows written",
                "seconds in write",
                "rows/s",
                "ms per commit",
                "time for all rows",
            ],
            rows,
            "lrlrrrrr",
        ),
    ]
    harness.publish("the reference cache writer", body, args)


if __name__ == "__main__":
    main()
