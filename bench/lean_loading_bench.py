"""Benchmark: peak host RSS per rank while `dpokit train --gpus 2` starts (model loading and sharding).

Each of 2 worker processes runs the recipe's `setup()` (load the policy, check the layout, shard it with
FSDP2, build AdamW) and reports its own peak resident set size (`ru_maxrss`) at the end of setup, before
any training step. The model is a seeded Llama-style model of a few hundred million parameters saved in
safetensors (bf16 on disk), trained in full fine-tuning with fp32 master weights (4 bytes a parameter).

    python bench/lean_loading_bench.py                       # ~270M parameters
    python bench/lean_loading_bench.py --loading eager        # every rank loads the whole model (the old way)

Results: bench/lean_loading_results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def worker(workdir: str, loading: str) -> None:
    """One rank: the recipe's setup, then its peak RSS into ``rss_RANK.json``."""
    from dpokit.config import parse_recipe_args
    from dpokit.recipes.dpo import DPORecipe

    cfg = parse_recipe_args([
        "--config", "tiny_lora", f"model.path={workdir}/model", f"data.path={workdir}/prepared",
        f"output.dir={workdir}/run_{loading}", "model.method=full", f"reference.cache={workdir}/ref.h5",
        "reference.source=cache", "output.overwrite=true",
        f"model.lean_loading={'true' if loading == 'lean' else 'false'}", "training.max_steps=1",
    ])
    import dpokit.recipes.dpo as recipe_module

    peaks = {}
    build_reference = recipe_module.DPORecipe._build_reference

    def measured(self):  # called right after the policy is loaded (eager: not yet sharded), before any forward
        peaks["loaded"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return build_reference(self)

    recipe_module.DPORecipe._build_reference = measured
    recipe = DPORecipe(cfg)
    try:
        recipe.setup()
        peaks["setup"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(workdir, f"rss_{loading}_{recipe.dist.rank}.json").write_text(json.dumps(peaks))
    finally:
        recipe.cleanup()


def measure(workdir: Path, loading: str) -> list[dict]:
    from dpokit.distributed import launch_workers

    launch_workers(2, [sys.executable, str(Path(__file__).resolve()), "--worker", str(workdir), "--loading", loading])
    return [json.loads((workdir / f"rss_{loading}_{rank}.json").read_text()) for rank in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--loading", choices=["both", "eager", "lean"], default="both")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE / "lean_loading_results.md")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.loading)
        return

    import torch

    from fsdp_memory_bench import build_model, build_prepared

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        torch.set_default_dtype(torch.bfloat16)  # bf16 on disk, as released checkpoints are
        params = build_model(workdir / "model", args.vocab, args.hidden, args.layers)
        torch.set_default_dtype(torch.float32)
        build_prepared(workdir / "prepared", 8, args.vocab, 32)
        import subprocess  # in a process of its own: a forked worker would inherit this one's peak RSS

        subprocess.run([sys.executable, "-m", "dpokit", "ref-logps", str(workdir / "prepared"), "--model",
                        str(workdir / "model"), "--out", str(workdir / "ref.h5")], check=True, stdout=subprocess.DEVNULL)
        loadings = ["eager", "lean"] if args.loading == "both" else [args.loading]
        results = {loading: measure(workdir, loading) for loading in loadings}

    lines = [
        "# Peak host RSS per rank at start-up: `dpokit train --gpus 2`",
        "",
        f"Command: `python bench/lean_loading_bench.py --layers {args.layers} --hidden {args.hidden} --vocab {args.vocab}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only (gloo); "
        f"load average at the end {os.getloadavg()[0]:.1f}. torch {torch.__version__}.",
        f"Model: Llama-style, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: {params / 1e6:.0f}M "
        f"parameters, bf16 safetensors on disk ({params * 2 / 2**20:.0f} MB); full fine-tuning keeps fp32 master "
        f"weights ({params * 4 / 2**20:.0f} MB whole, half of that a rank once sharded).",
        "",
        "DPO from a reference cache (`dpokit ref-logps` first). Each rank's peak resident set (`ru_maxrss`) when the "
        "policy is loaded (before any forward pass), and at the end of the recipe's `setup()` (FSDP2 "
        "applied, layout settled, AdamW built), before the first step; both loadings in the same invocation. The "
        "larger of the two ranks:",
        "",
        "| loading | peak when loaded (MB) | vs eager | peak at the end of setup (MB) | vs eager |",
        "|---|---:|---:|---:|---:|",
    ]
    worst = {loading: {key: max(rank[key] for rank in ranks) for key in ("loaded", "setup")} for loading, ranks in results.items()}
    for loading, peak in worst.items():
        base = worst.get("eager", peak)
        lines.append(f"| {loading} | {peak['loaded']:.0f} | {peak['loaded'] / base['loaded']:.2f}x | "
                     f"{peak['setup']:.0f} | {peak['setup'] / base['setup']:.2f}x |")
    lines += [
        "",
        "## Reading",
        "",
        "- Loading: eager, every rank reads the whole checkpoint and converts it to fp32 master weights (the whole "
        "model, plus conversion buffers) before FSDP2 shards it; lean, every rank builds the model on the meta "
        "device, shards it, allocates only its own shards and reads only their rows from the safetensors file "
        "(plain reads, no memory map). This is the part that is host memory on a GPU machine, where 8 ranks of "
        "an 8B model in fp32 would otherwise need 8 x 32 GB of host RAM at once.",
        "- The end of setup: eager runs the start-up layout check (a forward pass on a few pairs against the "
        "model's own logits) on the whole model, before sharding. Lean skips it when the cache's `dpokit ref-logps` "
        "pass ran it on these very weights with the same attention (the cache records it; the step-0 check then "
        "compares the policy's first batch with the cache). When it must run (no cache, a resumed run, an older "
        "cache) it is the first FSDP2 forward, whose gathered units are device memory, which on a CPU is this host "
        "memory, and glibc keeps the freed all-gather buffers of distinct sizes: the end-of-setup peak is then "
        "about the eager one (2,084 against 1,869 MB in an earlier run of this bench with a reference-free loss).",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
