"""Benchmark: ranked data trained as it is (k completions behind one prompt) against the same data expanded into pairs.

A prompt with k = 4 completions of distinct scores holds 6 preference pairs. The plain way (what every other tool
asks for) expands it: 6 pair rows, so the prompt is computed 6 times and each completion 3 times, in the reference
pass and in every training step. dpokit's ranked layout computes the prompt once and each completion once, and
all-pairs DPO (``loss.name=dpo loss.pairs=all``) takes the mean of the same 6 pair losses from those 4 log-probs.

Both runs use the same model, data, loss and steps, each in its own process (its own peak memory):

* ``ranked``: the groups as prepared (``completion_ids``, ``scores``), ``data.batch_size=B`` groups per step;
* ``expanded``: the 6 pairs of each prompt as pair rows, consecutive, ``data.batch_size=6B`` pairs per step and
  ``data.shuffle=false`` on both: every step holds the same prompts' pairs, so the two runs' losses agree step by
  step (the bench reports the largest difference: the check that the comparison is fair).

Both use dpokit's default layout (packing and prefix sharing: a pair's prompt is already computed once for its two
completions, so the gain measured here is only what ranked groups add), full fine-tuning in float32, a cached
reference (``dpokit ref-logps`` runs once per data and is timed separately). Workload: random token ids, prompts of
about 150 tokens (16-512), completions of about 120 (8-384), a seeded Llama (vocab 8,000, hidden 256, 4 layers).
Time is the training steps' time as the recipe logs it (fetching and collating, forward, backward, optimizer),
the first step left out; memory is the process's peak RSS at its last step.

    python bench/ranked_bench.py                 # ~10 min on 2 CPU cores, appends to bench/ranked_results.md
    python bench/ranked_bench.py --groups 64 --batch-size 2
    python bench/ranked_bench.py --quick         # a toy workload in seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np

K = 4


def ranked_rows(groups: int, vocab: int, seed: int = 0) -> list[dict]:
    """`groups` prompts with `K` completions each, scores ``K-1 .. 0`` in a random order (no ties)."""
    rng = np.random.default_rng(seed)
    prompts = harness.lognormal_lengths(groups, 150, 16, 512, seed=seed + 1)
    completions = harness.lognormal_lengths(groups * K, 120, 8, 384, seed=seed + 2).reshape(groups, K)
    return [
        {
            "prompt_ids": rng.integers(2, vocab, int(p)).tolist(),
            "completion_ids": [rng.integers(2, vocab, int(c)).tolist() for c in lengths],
            "scores": rng.permutation(K).astype(float).tolist(),
        }
        for p, lengths in zip(prompts, completions)
    ]


def expanded_pairs(rows: list[dict]) -> list[dict]:
    """Every pair of each group (higher score chosen), a group's pairs consecutive: what the plain way trains on."""
    pairs = []
    for row in rows:
        for i, j in itertools.combinations(range(len(row["scores"])), 2):
            better, worse = (i, j) if row["scores"][i] > row["scores"][j] else (j, i)
            pairs.append(
                {
                    "prompt_ids": row["prompt_ids"],
                    "chosen_ids": row["completion_ids"][better],
                    "rejected_ids": row["completion_ids"][worse],
                }
            )
    return pairs


def reference_pass(work: Path, batch_size: int) -> float:
    """`dpokit ref-logps` over ``work``'s prepared/ and model/ (float32) into ref.h5; its seconds."""
    from dpokit.reference.compute import compute_reference_cache

    started = time.perf_counter()
    compute_reference_cache(harness.reference_options(work, batch_size))
    return time.perf_counter() - started


def train(work: Path, batch_size: int, steps: int, quick: bool, ranked: bool) -> dict:
    """One training run of `steps` steps on ``work``; its step times, losses and peak memory."""
    run_dir = work / "run"
    overrides = [
        f"data.path={work / 'prepared'}",
        f"model.path={work / 'model'}",
        f"reference.cache={work / 'ref.h5'}",
        f"output.dir={run_dir}",
        "model.method=full",
        "model.dtype=float32",
        f"data.batch_size={batch_size}",
        "data.shuffle=false",
        "data.packing=true",
        "data.prefix_sharing=true",
        f"training.max_steps={steps}",
        "training.log_every=1",
        "training.eval_every=0",
        "training.save_every=0",
        "scheduler.warmup_steps=0",
        "output.overwrite=true",
        *(["loss.pairs=all"] if ranked else []),
    ]
    started = time.perf_counter()
    harness.dpokit_train(overrides, quick)
    wall = time.perf_counter() - started
    records = harness.train_records(run_dir)
    rate = "groups_per_s" if ranked else "pairs_per_s"
    return {
        "seconds": [batch_size / r[rate] for r in records],
        "losses": [r["loss"] for r in records],
        "peak_mb": records[-1]["peak_memory_mb"],
        "wall": wall,
    }


def child(work: str, batch_size: int, steps: int, ranked: bool) -> None:
    """In a fresh process: one `train` run, its result as the last stdout line."""
    print(json.dumps(train(Path(work), batch_size, steps, quick=False, ranked=ranked)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=96, help="prompts, K=4 completions each")
    parser.add_argument("--batch-size", type=int, default=4, help="groups per step (the expanded run takes 6x pairs)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = harness.arguments(parser, __file__, argv, quick=dict(groups=8, batch_size=2, hidden=64, layers=2, vocab=500))
    if args.child:
        work, batch_size, steps, ranked = args.child
        child(work, int(batch_size), int(steps), ranked == "ranked")
        return
    rows = ranked_rows(args.groups, args.vocab)
    steps = args.groups // args.batch_size  # one epoch
    results, reference = {}, {}
    with tempfile.TemporaryDirectory(prefix="ranked_bench_") as tmp:
        for name, data, batch_size in (
            ("ranked", rows, args.batch_size),
            ("expanded", expanded_pairs(rows), args.batch_size * 6),
        ):
            work = Path(tmp) / name
            work.mkdir()
            harness.llama(work / "model", args.vocab, args.hidden, args.layers)
            harness.write_rows(work / "prepared", data)
            reference[name] = reference_pass(work, batch_size=8)
            argv = ["--child", str(work), str(batch_size), str(steps), name]
            run = functools.partial(train, work, batch_size, steps, True, name == "ranked")
            results[name] = harness.measured(run, __file__, argv, args.quick)
    timed = {name: sum(result["seconds"][1:]) or sum(result["seconds"]) for name, result in results.items()}
    difference = max(abs(a - b) for a, b in zip(results["ranked"]["losses"], results["expanded"]["losses"]))
    body = [
        f"{args.groups} prompts x {K} completions (= {6 * args.groups} pairs), {steps} steps of {args.batch_size} "
        f"prompts, Llama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, full fine-tuning float32, "
        "packing + prefix sharing, cached reference. Training time: the logged step times, first step left out.",
        "",
        *harness.table(
            ["data", "rows", "ref-logps s", "training s", "speed-up", "peak RSS MiB", "memory ratio"],
            [
                [
                    name,
                    str(len(rows) if name == "ranked" else 6 * len(rows)),
                    f"{reference[name]:.1f}",
                    f"{timed[name]:.1f}",
                    f"{timed['expanded'] / timed[name]:.2f}x",
                    f"{results[name]['peak_mb']:.0f}",
                    f"{results[name]['peak_mb'] / results['expanded']['peak_mb']:.2f}x",
                ]
                for name in ("expanded", "ranked")
            ],
            align="lrrrrrr",
        ),
        "",
        f"Same effective loss: the largest difference between the two runs' step losses is {difference:.2e}.",
    ]
    harness.publish("ranked groups against expanded pairs", body, args)


if __name__ == "__main__":
    sys.exit(main())
