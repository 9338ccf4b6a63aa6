"""Benchmark: memory of full fine-tuning in each precision mode (fp32, bf16 mixed, bf16 pure).

Full fine-tuning with AdamW holds, per parameter, the weight, its gradient and two optimizer moments.
What they cost depends on ``model.dtype`` and ``model.precision``:

* ``model.dtype=float32``: everything in fp32, 4 + 4 + 8 = 16 bytes/parameter;
* ``model.dtype=bfloat16 model.precision=mixed`` (the default): fp32 master weights, gradients and
  AdamW state (16 bytes), plus the bf16 copies of the matmul weights torch.autocast makes in the
  forward, which autograd keeps until the backward is done (2 bytes): at most 18 bytes/parameter;
* ``model.dtype=bfloat16 model.precision=pure``: weights, gradients and AdamW state all in bf16,
  2 + 2 + 4 = 8 bytes/parameter.

Each mode runs a few full fine-tuning steps in its own fresh process (the recipe's ``DPORecipe``,
``loss.name=simpo`` so that no reference model or cache adds memory) on the same seeded Llama-style
model and data (random ids under a word-level tokenizer). Peak memory is the recipe's
``peak_memory_mb`` at the last training step (the process's ru_maxrss on CPU, before the final
checkpoint is written); a baseline process that imports the same modules and loads nothing gives the
runtime's share, and (peak - baseline) / parameters is the bytes/parameter the mode costs in practice
(it includes activations, small here: short sequences, batch 2). The model and data are built in a
child as well: on Linux a child's ru_maxrss starts at its parent's peak. Pairs/s is the recipe's (median
over the steps after the first), with one torch thread per run by default (``--threads``; as in
`bench/train_bench.py`, a second OpenMP thread stalls whenever another process holds its core). A
second run per mode, one step at lr 1e-6 (constant, no warmup), shows what master weights are for:
the fraction of decoder-layer weights that differ from the initial ones afterwards.

    python bench/precision_bench.py                   # 127M parameters (~2 min), appends to bench/precision_results.md
    python bench/precision_bench.py --layers 2        # quicker (the fixed overhead then weighs more per parameter)
    python bench/precision_bench.py --quick           # a tiny model, 2 steps, in this process: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness

MODES = {
    "fp32": ["model.dtype=float32"],
    "bf16 mixed": ["model.dtype=bfloat16", "model.precision=mixed"],
    "bf16 pure": ["model.dtype=bfloat16", "model.precision=pure"],
}
THEORY = {  # bytes/parameter: weights + gradients + AdamW moments (+ autocast's bf16 weight copies)
    "fp32": ("4 + 4 + 8", "16"),
    "bf16 mixed": ("16 + 2 autocast copies", "<= 18"),
    "bf16 pure": ("2 + 2 + 4", "8"),
}


# ----------------------------------------------------------------------------------------------
# Children: each measurement is a fresh interpreter


def recipe_module():
    from dpokit.launch import builtin_recipe_path, load_recipe_module

    return load_recipe_module(builtin_recipe_path())


def child_build(workdir: Path, vocab: int, hidden: int, layers: int, pairs: int, length: int) -> dict:
    """The model and data, built in a child: on Linux a child's ru_maxrss starts from its parent's
    peak RSS (the high-water mark survives fork and exec), so the parent must stay small."""
    params = harness.llama(workdir / "model", vocab, hidden, layers)
    half = length // 2
    harness.write_rows(workdir / "prepared", harness.random_pairs(pairs, vocab, half, half, half))
    return {"params": params}


def child_baseline() -> dict:
    """Import everything a training child imports, load nothing: the runtime's share of peak RSS."""
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from dpokit.config import load_config  # noqa: F401

    recipe_module()
    return {"peak_rss_mb": harness.peak_rss_mib()}


def run_recipe(workdir: Path, run_dir: Path, mode: str, extra: list[str]):
    """The recipe's setup, train and cleanup in this process; the recipe, for its policy and optimizer."""
    from dpokit.config import load_config

    args = [
        f"model.path={workdir / 'model'}",
        f"data.path={workdir / 'prepared'}",
        f"output.dir={run_dir}",
        "model.method=full",
        *MODES[mode],
        "loss.name=simpo",
        "training.eval_every=0",
        "training.log_every=1",
        "output.overwrite=true",
        *extra,
    ]
    recipe = recipe_module().DPORecipe(load_config("tiny_lora", args))
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


def child_train(workdir: Path, mode: str, steps: int, batch_size: int) -> dict:
    """`steps` full fine-tuning steps; the recipe's own metrics give peak RSS and pairs/s."""
    run_dir = workdir / f"run_{mode.replace(' ', '_')}"
    started = time.perf_counter()
    recipe = run_recipe(workdir, run_dir, mode, [f"training.max_steps={steps}", f"data.batch_size={batch_size}"])
    seconds = time.perf_counter() - started
    train = harness.train_records(run_dir)
    first = 1 if len(train) > 1 else 0  # the first step warms up
    param = next(recipe.policy.parameters())
    return {
        "peak_mb": train[-1]["peak_memory_mb"],
        "process_peak_mb": harness.peak_rss_mib(),  # also counts writing the final checkpoint
        "pairs_per_s": statistics.median(r["pairs_per_s"] for r in train[first:]),
        "seconds": seconds,
        "loss": train[-1]["loss"],
        "params": sum(p.numel() for p in recipe.policy.parameters()),
        "param_dtype": str(param.dtype).removeprefix("torch."),
        "adam_dtype": str(recipe.optimizer.state[param]["exp_avg"].dtype).removeprefix("torch."),
    }


def child_changed(workdir: Path, mode: str) -> dict:
    """One step at lr 1e-6; the fraction of decoder-layer weights that moved from the initial ones."""
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = workdir / f"changed_{mode.replace(' ', '_')}"
    extra = [
        "training.max_steps=1",
        "data.batch_size=2",
        "optimizer.lr=1e-6",
        "scheduler.name=constant",
        "scheduler.warmup_steps=0",
    ]
    policy = run_recipe(workdir, run_dir, mode, extra).policy
    initial = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32).state_dict()
    changed = total = 0
    for name, param in policy.state_dict().items():
        if name in initial and ".layers." in name:
            # Compared in the policy's own dtype: a bf16 policy starts as the bf16 rounding of the fp32 weights.
            changed += int((param.float() != initial[name].to(param.dtype).float()).sum())
            total += param.numel()
    return {"changed_fraction": changed / total}


CHILDREN = {
    "build": lambda rest: child_build(Path(rest[0]), *map(int, rest[1:])),
    "baseline": lambda rest: child_baseline(),
    "train": lambda rest: child_train(Path(rest[0]), rest[1], int(rest[2]), int(rest[3])),
    "changed": lambda rest: child_changed(Path(rest[0]), rest[1]),
}


def run_child(args, child: list[str], threads: int = 1) -> dict:
    """``--child KIND ARGS`` in a fresh interpreter with `threads` torch threads (in this process with --quick)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    return harness.measured(lambda: CHILDREN[child[0]](child[1:]), __file__, ["--child", *child], args.quick, env=env)


# ----------------------------------------------------------------------------------------------
# Parent


def report(args, params: int, baseline: float, results: dict, changed: dict) -> list[str]:
    fp32 = results["fp32"]["peak_mb"]
    rows = []
    for mode, r in results.items():
        above = r["peak_mb"] - baseline
        formula, theory = THEORY[mode]
        rows.append(
            (
                mode,
                f"{r['param_dtype']} / {r['adam_dtype']}",
                f"{r['peak_mb']:.0f}",
                f"{above:.0f}",
                f"{above * 2**20 / params:.1f}",
                f"{(r['peak_mb'] - fp32) * 2**20 / params:+.1f}",
                f"{theory} ({formula})",
                f"{r['pairs_per_s']:.2f}",
                f"{changed[mode]:.1%}",
            )
        )
    return [
        f"Llama-style, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: {params / 1e6:.1f}M parameters; "
        f"{args.steps} full fine-tuning steps, batch {args.batch_size} pairs, {args.length} tokens a sequence, SimPO, "
        f"AdamW, {args.threads} torch thread(s). Baseline (imports only): {baseline:.0f} MB. Whole-process peaks, final "
        "checkpoint included: " + ", ".join(f"{m} {r['process_peak_mb']:.0f} MB" for m, r in results.items()) + ".",
        "",
        *harness.table(
            [
                "mode",
                "params / AdamW state",
                "peak RSS (MB)",
                "peak - baseline (MB)",
                "bytes/param measured",
                "vs fp32 (bytes/param)",
                "bytes/param theory",
                "pairs/s",
                "decoder weights changed by 1 step at lr 1e-6",
            ],
            rows,
            "llrrrrrrr",
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(CHILDREN[argv[1]](argv[2:])))
        return

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence (prompt + completion)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (1: on a shared machine a second OpenMP thread stalls whenever "
        "another process holds its core; memory does not depend on it)",
    )
    args = harness.arguments(parser, __file__, argv, quick=dict(layers=2, hidden=64, vocab=1000, length=32, steps=2))

    with tempfile.TemporaryDirectory() as tmp:
        workdir = str(tmp)
        sizes = (args.vocab, args.hidden, args.layers, args.batch_size * args.steps, args.length)
        params = run_child(args, ["build", workdir, *map(str, sizes)])["params"]
        baseline = run_child(args, ["baseline"])["peak_rss_mb"]
        results, changed = {}, {}
        for mode in MODES:
            results[mode] = run_child(
                args, ["train", workdir, mode, str(args.steps), str(args.batch_size)], args.threads
            )
            print(f"{mode}: {results[mode]}", file=sys.stderr)
        for mode in MODES:
            changed[mode] = run_child(args, ["changed", workdir, mode], args.threads)["changed_fraction"]
            print(f"{mode}: changed {changed[mode]:.4f}", file=sys.stderr)

    assert all(r["params"] == params for r in results.values())
    harness.publish("memory by precision mode", report(args, params, baseline, results, changed), args)


if __name__ == "__main__":
    main()
