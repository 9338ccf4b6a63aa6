"""Benchmark: peak host RSS per rank while `dpokit train --gpus 2` starts (model loading and sharding).

Each of 2 worker processes runs the recipe's `setup()` (load the policy, check the layout, shard it with
FSDP2, build AdamW) and reports its own peak resident set size (`ru_maxrss`) at the end of setup, before
any training step. The model is a seeded Llama-style model of a few hundred million parameters saved in
safetensors (bf16 on disk), trained in full fine-tuning with fp32 master weights (4 bytes a parameter),
DPO from a reference cache (`dpokit ref-logps` runs first). The basis of `model.lean_loading`
(bench/lean_loading_results.md).

    python bench/lean_loading_bench.py                       # ~250M parameters, eager and lean loading
    python bench/lean_loading_bench.py --loading eager        # every rank loads the whole model (the old way)
    python bench/lean_loading_bench.py --quick                # a tiny model, lean loading (2 workers still start)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import harness


def worker(workdir: str, loading: str) -> None:
    """One rank: the recipe's setup, then its peak RSS into ``rss_LOADING_RANK.json``."""
    from dpokit.config import parse_recipe_args
    from dpokit.recipes.dpo import DPORecipe

    cfg = parse_recipe_args(
        [
            "--config",
            "tiny_lora",
            f"model.path={workdir}/model",
            f"data.path={workdir}/prepared",
            f"output.dir={workdir}/run_{loading}",
            "model.method=full",
            f"reference.cache={workdir}/ref.h5",
            "reference.source=cache",
            "output.overwrite=true",
            f"model.lean_loading={'true' if loading == 'lean' else 'false'}",
            "training.max_steps=1",
        ]
    )
    recipe = DPORecipe(cfg)
    try:
        recipe.setup()
        peak = harness.peak_rss_mib()
        Path(workdir, f"rss_{loading}_{recipe.dist.rank}.json").write_text(json.dumps({"setup": peak}))
    finally:
        recipe.cleanup()


def measure(workdir: Path, loading: str) -> list[dict]:
    from dpokit.distributed import launch_workers

    launch_workers(2, [sys.executable, str(Path(__file__).resolve()), "--worker", str(workdir), "--loading", loading])
    return [json.loads((workdir / f"rss_{loading}_{rank}.json").read_text()) for rank in (0, 1)]


def reference_cache(workdir: Path, quick: bool) -> None:
    """`dpokit ref-logps` over the pairs: in a process of its own (a forked worker would inherit this one's peak
    RSS), or in this one with --quick."""
    if quick:
        from dpokit.reference.compute import RefLogpsOptions, compute_reference_cache

        compute_reference_cache(
            RefLogpsOptions(
                prepared=str(workdir / "prepared"), model=str(workdir / "model"), out=str(workdir / "ref.h5")
            )
        )
        return
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dpokit",
            "ref-logps",
            str(workdir / "prepared"),
            "--model",
            str(workdir / "model"),
            "--out",
            str(workdir / "ref.h5"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--loading", choices=["both", "eager", "lean"], default="both")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = harness.arguments(
        parser,
        __file__,
        argv,
        quick=dict(layers=2, hidden=64, vocab=1000),
        quick_help=harness.QUICK_HELP + "; lean loading only, the 2 workers still start",
    )
    if args.worker:
        worker(args.worker, args.loading)
        return
    if args.quick and args.loading == "both":
        args.loading = "lean"

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        torch.set_default_dtype(torch.bfloat16)  # bf16 on disk, as released checkpoints are
        params = harness.llama(workdir / "model", args.vocab, args.hidden, args.layers)
        torch.set_default_dtype(torch.float32)
        harness.write_rows(workdir / "prepared", harness.random_pairs(8, args.vocab, 16, 16, 16))
        reference_cache(workdir, args.quick)
        loadings = ["eager", "lean"] if args.loading == "both" else [args.loading]
        results = {loading: measure(workdir, loading) for loading in loadings}

    worst = {loading: max(rank["setup"] for rank in ranks) for loading, ranks in results.items()}
    eager = worst.get("eager")
    rows = [(loading, f"{peak:.0f}", f"{peak / eager:.2f}x" if eager else "-") for loading, peak in worst.items()]
    body = [
        f"Llama-style, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: {params / 1e6:.1f}M parameters, "
        f"bf16 safetensors on disk ({params * 2 / 2**20:.0f} MB); fp32 master weights ({params * 4 / 2**20:.0f} MB whole, "
        "half of that a rank once sharded). The larger of the two ranks' peaks at the end of `setup()`:",
        "",
        *harness.table(["loading", "peak at the end of setup (MB)", "vs eager"], rows, "lrr"),
    ]
    harness.publish("peak RSS per rank at start-up, 2 processes", body, args)


if __name__ == "__main__":
    main()
