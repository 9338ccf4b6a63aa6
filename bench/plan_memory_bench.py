"""Benchmark: `dpokit plan`'s estimate against memory measured on CPU.

Two measurements on a small Llama-style model (GQA, gated MLP, a word-level tokenizer) and prepared pairs of
random ids, prompt, chosen and rejected each half `--length` tokens:

1. Allocator peak of one training step (the second, when AdamW's state exists), in this process: every
   allocation and free of the step recorded by torch's profiler (``profile_memory=True``), replayed in
   time order; peak = the tensors alive before the step (weights, optimizer state) + the highest running
   sum. This is CPU's counterpart of ``torch.cuda.max_memory_allocated``; it is compared with the plan's
   peak for ``--device cpu`` (float32 compute unless the row says bfloat16).
2. Peak RSS of real ``dpokit train`` runs (``peak_memory_mb`` in metrics.jsonl) at two batch sizes of
   longer pairs (the step must rise above the start-up's RSS peak, about 1.2 GB): the difference is what
   the activations add, compared with the difference of the plan's peaks (RSS itself also holds the
   Python/torch runtime, the data and the loaded checkpoint).

    python bench/plan_memory_bench.py            # appends to bench/plan_memory_results.md (about 10 minutes on 2 cores)
    python bench/plan_memory_bench.py --quick    # a tiny model, two configs, in this process: checks that it runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import harness

CASES = [  # overrides of the tiny_lora config; each is one row of the allocator table
    ["model.method=lora"],
    ["model.method=lora", "model.activation_checkpointing=true"],
    ["model.method=lora", "data.batch_size=8"],
    ["model.method=lora", "model.activation_checkpointing=true", "data.batch_size=8"],
    ["model.method=lora", "model.dtype=bfloat16"],
    ["model.method=full"],
    ["model.method=full", "model.activation_checkpointing=true"],
    ["model.method=full", "model.activation_checkpointing=true", "data.batch_size=8"],
    ["model.method=full", "data.packing=false", "data.prefix_sharing=false"],
    ["model.method=full", "model.dtype=bfloat16", "model.precision=pure"],
]
MARKER = 123457  # bytes of a tensor allocated just before backward, to find that moment in the profile


def measured_step_peak(cfg, prepared: Path) -> tuple[int, int, int]:
    """(bytes alive before the step, highest bytes allocated during it, bytes allocated when backward starts)
    for one DPO step of `cfg` on CPU."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from dpokit.data.collate import collate_pairs
    from dpokit.data.prepared import load_prepared
    from dpokit.logps import concatenated_forward
    from dpokit.model import load_policy
    from dpokit.optim import build_optimizer

    split = load_prepared(prepared).split("train")
    rows = [split[i] for i in range(cfg.data.batch_size)]
    model = load_policy(cfg.model, cfg.lora, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optimizer)

    def step() -> None:
        batch = collate_pairs(rows, list(range(len(rows))), 0, cfg.data.packing, cfg.data.prefix_sharing)
        out = concatenated_forward(model, batch, cfg.data.logps_chunk_size)
        loss = -F.logsigmoid(0.1 * (out.chosen_logps - out.rejected_logps)).mean()
        marker = torch.empty(MARKER, dtype=torch.uint8)  # noqa: F841 (its allocation marks the start of backward)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    alive = sum(p.numel() * p.element_size() for p in model.parameters())
    alive += sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    )
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    at_backward = None
    for _, nbytes in events:
        if nbytes == MARKER and at_backward is None:
            at_backward = running
        running += nbytes
        peak = max(peak, running)
    return alive, peak, at_backward or 0


def planned(cfg, model_dir: Path, prepared: Path):
    from dpokit.plan import estimate, model_census, workload

    census = model_census(model_dir / "config.json", cfg.model.method, cfg.lora)
    return estimate(census, cfg, workload(cfg, str(prepared)), 1, "cpu")


def rss_run(workdir: Path, overrides: list[str], batch: int, quick: bool) -> float:
    """Peak RSS (MiB, as `ru_maxrss` gives it) of a 2-step `dpokit train` run on the long pairs."""
    run_dir = workdir / f"run_{batch}_{abs(hash(tuple(overrides)))}"
    harness.dpokit_train(
        [
            f"model.path={workdir / 'model'}",
            f"data.path={workdir / 'prepared_long'}",
            f"output.dir={run_dir}",
            "training.max_steps=2",
            "training.eval_every=0",
            f"data.batch_size={batch}",
            "output.overwrite=true",
            "logging.report_to=[]",
            *overrides,
        ],
        quick,
    )
    return max(r["peak_memory_mb"] for r in harness.train_records(run_dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--length", type=int, default=160, help="tokens per sequence (prompt + completion)")
    parser.add_argument("--rss-length", type=int, default=512, help="tokens per sequence of the `dpokit train` runs")
    parser.add_argument("--rss-batches", type=int, nargs=2, default=(8, 16), help="the two batch sizes of those runs")
    args = harness.arguments(
        parser,
        __file__,
        argv,
        quick=dict(hidden=64, layers=2, vocab=1000, length=32, rss_length=64, rss_batches=(2, 4)),
    )
    cases = [CASES[0], CASES[5]] if args.quick else CASES

    from dpokit.config import load_config

    small, large = args.rss_batches
    step_rows, rss_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        harness.llama(workdir / "model", args.vocab, args.hidden, args.layers)
        half, long_half = args.length // 2, args.rss_length // 2
        harness.write_rows(workdir / "prepared", harness.random_pairs(16, args.vocab, half, half, half))
        harness.write_rows(
            workdir / "prepared_long",
            harness.random_pairs(2 * max(args.rss_batches), args.vocab, long_half, long_half, long_half),
        )
        for overrides in cases:
            cfg = load_config("tiny_lora", [f"model.path={workdir / 'model'}", *overrides], world_size=1)
            alive, peak, at_backward = measured_step_peak(cfg, workdir / "prepared")
            plan = planned(cfg, workdir / "model", workdir / "prepared")
            measured = alive + peak
            step_rows.append(
                (
                    " ".join(overrides),
                    f"{plan.total / 2**20:.1f}",
                    f"{measured / 2**20:.1f}",
                    f"{plan.total / measured:.2f}",
                    f"{plan.bytes('activations (saved)') / 2**20:.1f}",
                    f"{at_backward / 2**20:.1f}",
                )
            )
            print(" | ".join(step_rows[-1]), file=sys.stderr, flush=True)
        for overrides in (["model.method=lora", "reference.source=live"], ["model.method=full", "loss.name=simpo"]):
            rss = [rss_run(workdir, overrides, b, args.quick) for b in (small, large)]
            plans = [
                planned(
                    load_config(
                        "tiny_lora",
                        [f"model.path={workdir / 'model'}", *overrides, f"data.batch_size={b}"],
                        world_size=1,
                    ),
                    workdir / "model",
                    workdir / "prepared_long",
                ).total
                / 2**20
                for b in (small, large)
            ]
            rss_rows.append(
                (
                    " ".join(overrides),
                    f"{rss[0]:.0f}",
                    f"{rss[1]:.0f}",
                    f"{rss[1] - rss[0]:.0f}",
                    f"{plans[0]:.0f} / {plans[1]:.0f}",
                    f"{plans[1] - plans[0]:.0f}",
                )
            )
            print(" | ".join(rss_rows[-1]), file=sys.stderr, flush=True)
    body = [
        f"Llama-style, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; prompt, chosen and rejected "
        f"{args.length // 2} tokens each (all alike: the plan's longest pair is every pair).",
        "",
        "Allocator peak of one training step (tensors only: what `torch.cuda.max_memory_allocated` counts on a GPU):",
        "",
        *harness.table(
            [
                "overrides of tiny_lora",
                "planned peak (MiB)",
                "measured peak (MiB)",
                "planned / measured",
                "planned saved activations (MiB)",
                "measured at the start of backward (MiB)",
            ],
            step_rows,
            "lrrrrr",
        ),
        "",
        f"Peak RSS of `dpokit train` (2 steps) at batch {small} and {large}, sequences of {args.rss_length} tokens (the "
        "difference is what the activations add):",
        "",
        *harness.table(
            [
                "overrides of tiny_lora",
                f"RSS batch {small} (MiB)",
                f"RSS batch {large} (MiB)",
                "measured difference (MiB)",
                f"planned peak batch {small} / {large} (MiB)",
                "planned difference (MiB)",
            ],
            rss_rows,
            "lrrrrr",
        ),
    ]
    harness.publish("`dpokit plan` against measured memory", body, args)


if __name__ == "__main__":
    main()
