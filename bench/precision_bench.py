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
model and data (built with `bench/fsdp_memory_bench.py`'s helpers). Peak memory is the recipe's
``peak_memory_mb`` at the last training step (the process's ru_maxrss on CPU, before the final
checkpoint is written); a baseline process that imports the same modules and loads nothing gives the
runtime's share, and (peak - baseline) / parameters is the bytes/parameter the mode costs in practice
(it includes activations, small here: short sequences, batch 2). The model and data are built in a
child as well: on Linux a child's ru_maxrss starts at its parent's peak. Pairs/s is the recipe's,
over the steps after the first, with one torch thread per run by default (``--threads``; as in
`bench/train_bench.py`, a second OpenMP thread stalls whenever another process holds its core). A
second run per mode, one step at lr 1e-6 (constant, no warmup), shows what master weights are for:
the fraction of decoder-layer weights that differ from the initial ones afterwards.

    python bench/precision_bench.py                   # 127M parameters (~2 min), writes bench/precision_results.md
    python bench/precision_bench.py --layers 2        # quicker (the fixed overhead then weighs more per parameter)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).parent

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


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# Children: each measurement is a fresh interpreter


def recipe_module():
    from dpokit.launch import builtin_recipe_path, load_recipe_module

    return load_recipe_module(builtin_recipe_path())


def child_build(workdir: Path, vocab: int, hidden: int, layers: int, pairs: int, length: int) -> dict:
    """The model and data, built in a child: on Linux a child's ru_maxrss starts from its parent's
    peak RSS (the high-water mark survives fork and exec), so the parent must stay small."""
    sys.path.insert(0, str(HERE))
    from fsdp_memory_bench import build_model, build_prepared  # the same model and data builders

    params = build_model(workdir / "model", vocab, hidden, layers)
    build_prepared(workdir / "prepared", pairs, vocab, length)
    return {"params": params}


def child_baseline() -> dict:
    """Import everything a training child imports, load nothing: the runtime's share of peak RSS."""
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from dpokit.config import load_config  # noqa: F401

    recipe_module()
    return {"peak_rss_mb": peak_rss_mb()}


def run_recipe(workdir: Path, run_dir: Path, mode: str, extra: list[str], on_setup=None):
    from dpokit.config import load_config

    args = [
        f"model.path={workdir / 'model'}", f"data.path={workdir / 'prepared'}", f"output.dir={run_dir}",
        "model.method=full", *MODES[mode], "loss.name=simpo", "training.eval_every=0", "training.log_every=1",
        "output.overwrite=true", *extra,
    ]
    recipe = recipe_module().DPORecipe(load_config("tiny_lora", args))
    try:
        recipe.setup()
        if on_setup is not None:
            on_setup(recipe)
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


def child_train(workdir: Path, mode: str, steps: int, batch_size: int) -> dict:
    """`steps` full fine-tuning steps; the recipe's own metrics give peak RSS and pairs/s."""
    run_dir = workdir / f"run_{mode.replace(' ', '_')}"
    cpu_start, cpu_end = [], []

    def clock_steps(recipe) -> None:
        """CPU seconds of each step, over the same span the recipe times (train_step + optimizer_step)."""
        train_step, optimizer_step = recipe.train_step, recipe.optimizer_step

        def timed_train_step(*args, **kwargs):
            cpu_start.append(time.process_time())
            return train_step(*args, **kwargs)

        def timed_optimizer_step(*args, **kwargs):
            result = optimizer_step(*args, **kwargs)
            cpu_end.append(time.process_time())
            return result

        recipe.train_step, recipe.optimizer_step = timed_train_step, timed_optimizer_step

    started = time.perf_counter()
    extra = [f"training.max_steps={steps}", f"data.batch_size={batch_size}"]
    recipe = run_recipe(workdir, run_dir, mode, extra, on_setup=clock_steps)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    first = 1 if len(train) > 1 else 0  # the first step warms up
    timed = [r["pairs_per_s"] for r in train[first:]]
    cpu = sum(end - start for start, end in zip(cpu_start[first:], cpu_end[first:]))
    param = next(recipe.policy.parameters())
    state = recipe.optimizer.state[param]
    return {
        "peak_mb": train[-1]["peak_memory_mb"],
        "process_peak_mb": peak_rss_mb(),  # also counts writing the final checkpoint
        "pairs_per_s": statistics.median(timed),
        "step_rates": timed,
        "pairs_per_cpu_s": batch_size * len(timed) / cpu,
        "seconds": seconds,
        "loss": train[-1]["loss"],
        "params": sum(p.numel() for p in recipe.policy.parameters()),
        "param_dtype": str(param.dtype).removeprefix("torch."),
        "adam_dtype": str(state["exp_avg"].dtype).removeprefix("torch."),
    }


def child_changed(workdir: Path, mode: str) -> dict:
    """One step at lr 1e-6; the fraction of decoder-layer weights that moved from the initial ones."""
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = workdir / f"changed_{mode.replace(' ', '_')}"
    extra = ["training.max_steps=1", "data.batch_size=2", "optimizer.lr=1e-6", "scheduler.name=constant",
             "scheduler.warmup_steps=0"]
    policy = run_recipe(workdir, run_dir, mode, extra).policy
    initial = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32).state_dict()
    changed = total = 0
    for name, param in policy.state_dict().items():
        if name in initial and ".layers." in name:
            # Compared in the policy's own dtype: a bf16 policy starts as the bf16 rounding of the fp32 weights.
            changed += int((param.float() != initial[name].to(param.dtype).float()).sum())
            total += param.numel()
    return {"changed_fraction": changed / total}


def run_child(args: list[str], threads: int = 1) -> dict:
    """Run this file as a child with `args` and `threads` torch threads; its last stdout line is a JSON result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    process = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{process.stderr[-4000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Parent


def report(args, params: int, baseline: float, results: dict, changed: dict, load_start: float) -> str:
    command = "python bench/precision_bench.py"
    defaults = {"layers": 12, "hidden": 768, "vocab": 32000, "length": 128, "batch_size": 2, "steps": 4, "threads": 1}
    for key, default in defaults.items():
        if getattr(args, key) != default:
            command += f" --{key.replace('_', '-')} {getattr(args, key)}"
    lines = [
        "# Full fine-tuning memory by precision mode (fp32, bf16 mixed, bf16 pure)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU; torch threads "
        f"per run: {args.threads}; load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        f"Model: Llama-style, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: {params / 1e6:.1f}M "
        f"parameters. Workload: {args.steps} full fine-tuning steps, batch {args.batch_size} pairs, "
        f"{args.length} tokens per sequence, SimPO (no reference), AdamW. Baseline (imports only): {baseline:.0f} MB.",
        "",
        "| mode | params / AdamW state | peak RSS (MB) | peak - baseline (MB) | bytes/param measured | "
        "vs fp32 (bytes/param) | bytes/param theory | pairs/s | pairs/CPU-s | "
        "decoder weights changed by 1 step at lr 1e-6 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fp32 = results["fp32"]["peak_mb"]
    for mode, r in results.items():
        above = r["peak_mb"] - baseline
        formula, theory = THEORY[mode]
        moved = f"{changed[mode]:.1%}"
        lines.append(
            f"| {mode} | {r['param_dtype']} / {r['adam_dtype']} | {r['peak_mb']:.0f} | {above:.0f} | "
            f"{above * 2**20 / params:.1f} | {(r['peak_mb'] - fp32) * 2**20 / params:+.1f} | {theory} ({formula}) | "
            f"{r['pairs_per_s']:.2f} | {r['pairs_per_cpu_s']:.2f} | {moved} |"
        )
    lines += [
        "",
        "Peak RSS is the recipe's `peak_memory_mb` at the last step (ru_maxrss: it includes loading the model, the "
        f"activations of batch {args.batch_size} and the optimizer's temporaries); whole-process peaks including the "
        "final checkpoint write: " + ", ".join(f"{m} {r['process_peak_mb']:.0f} MB" for m, r in results.items())
        + ". Bytes/param measured = (peak - baseline) / parameters; theory counts weights + gradients + AdamW "
        "moments only. Pairs/s is the median of the recipe's rate over steps 2..N, pairs/CPU-s the same steps' "
        "pairs over their CPU time; one run each, on a shared virtual machine whose speed varies between runs: "
        "indicative only (this CPU has AVX512-BF16, so bf16 matmuls are faster than fp32 ones here).",
    ]
    return "\n".join(lines)


def interpretation(params: int, results: dict, changed: dict) -> str:
    def per_param(mb: float) -> float:
        return mb * 2**20 / params

    fp32, mixed, pure = (results[m] for m in ("fp32", "bf16 mixed", "bf16 pure"))
    saved = per_param(fp32["peak_mb"] - pure["peak_mb"])
    extra = per_param(mixed["peak_mb"] - fp32["peak_mb"])
    text = (
        f"Pure bf16 needs {pure['peak_mb'] / fp32['peak_mb']:.0%} of fp32's peak here ({saved:.1f} bytes/parameter "
        "less, against 8 in theory, since its activations and optimizer temporaries are bf16 too), while mixed bf16 "
        f"costs about what fp32 does ({extra:+.1f} bytes/parameter, at most +2: autocast's bf16 weight copies live "
        "only from the forward to the end of the backward). Every mode sits a roughly constant few hundred MB above "
        "its theory (data set and tokenizer, the batch's activations, AdamW's per-tensor temporaries on the large "
        "embedding and output matrices, allocator slack), so read the differences between modes rather than the "
        "absolute bytes/parameter. Choose `model.precision=mixed` (the default) for bf16 training whenever fp32 "
        "master weights fit: fp32's memory and update precision (one step at lr 1e-6 moved "
        f"{changed['bf16 mixed']:.0%} of the decoder weights) at bf16 matmul speed ({mixed['pairs_per_s']:.2f} vs "
        f"{fp32['pairs_per_s']:.2f} pairs/s for fp32 here), and `model.dtype=float32` on hardware without fast bf16. "
        "Use `pure` only when memory forces it: bf16 keeps 8 significant bits, so an update smaller than half the "
        "spacing between neighbouring bf16 values (0.4-0.8% of the weight, 1.2e-4 near 0.02) rounds away, and one "
        f"step at lr 1e-6 moved only {changed['bf16 pure']:.1%} of the decoder weights. Its AdamW moments are stored "
        "in bf16 as well, so at DPO's usual learning rates (1e-7 to 1e-6) a pure-bf16 run can barely move its "
        "weights while reporting no error."
    )
    return "\n## Interpretation\n\n" + textwrap.fill(text, width=110) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "build":
            result = child_build(Path(rest[0]), *map(int, rest[1:]))
        elif kind == "baseline":
            result = child_baseline()
        elif kind == "train":
            result = child_train(Path(rest[0]), rest[1], int(rest[2]), int(rest[3]))
        else:
            result = child_changed(Path(rest[0]), rest[1])
        print(json.dumps(result))
        return

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence (prompt + completion)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: on a shared machine a second OpenMP thread stalls whenever "
                             "another process holds its core; memory does not depend on it)")
    parser.add_argument("--out", type=Path, default=HERE / "precision_results.md")
    args = parser.parse_args()

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sizes = (args.vocab, args.hidden, args.layers, args.batch_size * args.steps, args.length)
        params = run_child(["--child", "build", str(workdir), *map(str, sizes)])["params"]
        baseline = run_child(["--child", "baseline"])["peak_rss_mb"]
        results = {}
        for mode in MODES:
            train = ["--child", "train", str(workdir), mode, str(args.steps), str(args.batch_size)]
            results[mode] = run_child(train, args.threads)
            print(f"{mode}: {results[mode]}", file=sys.stderr)
        changed = {}
        for mode in MODES:
            changed[mode] = run_child(["--child", "changed", str(workdir), mode], args.threads)["changed_fraction"]
            print(f"{mode}: changed {changed[mode]:.4f}", file=sys.stderr)

    assert all(r["params"] == params for r in results.values())
    table = report(args, params, baseline, results, changed, load_start)
    args.out.write_text(table + "\n" + interpretation(params, results, changed))
    print(table)


if __name__ == "__main__":
    main()
