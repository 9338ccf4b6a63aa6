"""Long rows: one training step with the old dense ``[R, 1, L, L]`` mask and with the O(L) layout attention.

    python bench/long_context_bench.py                      # appends a dated section to bench/long_context_results.md
    python bench/long_context_bench.py --models tiny --workloads w64,w128,w256,w384,w512,short --steps 5
    python bench/long_context_bench.py --quick              # tiny model, two small batches, in this process

One step is the decoder (`dpokit.logps.run_decoder`, ``dense=True``: the old path, which builds the mask with
`dpokit.data.collate.dense_mask` and hands it to SDPA; ``dense=False``: `dpokit.attention`), the completion
log-probs (`dpokit.logps.completion_logps`) and the backward of the DPO-style quantity
``(logps[:B] - logps[B:]).sum()``: full fine-tuning gradients, float32, a Llama built from its config with
seeded random weights, ``attn_implementation="sdpa"``. No optimizer step, so every step computes the same
numbers. Batches are prefix-shared and packed (`collate_pairs(..., packing=True, prefix_sharing=True)`). The layout
path runs the layout kernels at every width (`dpokit.attention.kernels_at_every_width`), where training keeps the
mask for rows of at most `dpokit.attention.DENSE_MAX_WIDTH` columns: the short-row sweep (second command) is the
basis of that constant.

Each (workload, model, path) runs in a fresh child process (this script with ``--child``), so its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``, which includes building the model) is that configuration's alone; the
child times ``--steps`` steps after ``--warmup`` and reports the median, its peak RSS and the log-probs. The
parent checks the two paths' log-probs (and per-parameter gradient norms) against each other.

Dense configurations whose mask memory is estimated above ``--dense-limit-gib`` are skipped. On CPU, SDPA with
a mask runs the CPU flash kernel, which takes the mask itself: it converts the bool mask to an additive float32
``[R, 1, L, L]`` copy in every layer and keeps it for backward, so the estimate is ``R·L²`` bytes (bool mask)
``+ layers · 4·R·L²`` bytes; no ``[heads, L, L]`` score tensor is built (see the results for the check).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import harness

GIB = 1 << 30

MODELS = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    ),
    "100M": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}


@dataclass(frozen=True)
class Workload:
    name: str
    pairs: int
    prompt: int
    chosen: int
    rejected: int
    pack_length: Optional[int] = None

    @property
    def pair_tokens(self) -> int:
        return self.prompt + self.chosen + self.rejected

    def rows_and_width(self) -> tuple[int, int]:
        """Rows and row length of the packed batch (first-fit decreasing of equal segments)."""
        capacity = max(self.pack_length or 0, self.pair_tokens)
        per_row = capacity // self.pair_tokens
        rows = -(-self.pairs // per_row)
        return rows, min(self.pairs, per_row) * self.pair_tokens


def one_pair(length: int) -> Workload:
    return Workload(f"1 pair/row, {length // 1024}k", 1, length // 4, 3 * length // 8, 3 * length // 8)


def short_rows(width: int) -> Workload:
    """2,048 tokens a batch in rows of `width` columns, one pair (half prompt) filling each row."""
    return Workload(
        f"{width}-column rows, {2048 // width} pairs", 2048 // width, width // 2, width // 4, width // 4, width
    )


WORKLOADS = {
    **{f"w{width}": short_rows(width) for width in (64, 128, 256, 384, 512)},
    "short": Workload("short rows (16 x 96+80+80, pack 1024)", 16, 96, 80, 80, 1024),
    "2k": one_pair(2048),
    "8k": one_pair(8192),
    "8k-multi": Workload("4 pairs/row (1000+500+500), pack 8192", 4, 1000, 500, 500, 8192),
    "32k": one_pair(32768),
}


# ---------------------------------------------------------------------------------------------
# Child: one configuration


def child(args) -> dict:
    """One (workload, model, path): ``--steps`` timed steps after ``--warmup``, the log-probs and gradient norms."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpokit import attention
    from dpokit.data.collate import collate_pairs
    from dpokit.logps import completion_logps, decoder_and_head, run_decoder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = MODELS[args.model]
    config = LlamaConfig(**spec, max_position_embeddings=65536, pad_token_id=0, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).float().train()
    decoder, head = decoder_and_head(model)
    workload = WORKLOADS[args.workload]
    rng = np.random.default_rng(0)
    rows = [
        {
            "prompt_ids": rng.integers(2, spec["vocab_size"], workload.prompt).tolist(),
            "chosen_ids": rng.integers(2, spec["vocab_size"], workload.chosen).tolist(),
            "rejected_ids": rng.integers(2, spec["vocab_size"], workload.rejected).tolist(),
        }
        for _ in range(workload.pairs)
    ]
    batch = collate_pairs(
        rows, list(range(len(rows))), pad_id=0, packing=True, prefix_sharing=True, pack_length=workload.pack_length
    )
    dense = args.path == "dense"
    b = batch.num_pairs

    def step():
        model.zero_grad(set_to_none=True)
        hidden = run_decoder(decoder, batch, dense=dense).last_hidden_state
        logps = completion_logps(head, hidden, batch).logps
        (logps[:b] - logps[b:]).sum().backward()
        return logps.detach()

    rss_before = harness.peak_rss_mib()
    seconds = []
    with contextlib.nullcontext() if dense else attention.kernels_at_every_width():
        for i in range(args.warmup + args.steps):
            started = time.perf_counter()
            logps = step()
            elapsed = time.perf_counter() - started
            if i >= args.warmup:
                seconds.append(elapsed)
            print(f"  step {i + 1}: {elapsed:.2f} s", file=sys.stderr, flush=True)
    grad_norms = [float(p.grad.norm()) if p.grad is not None else 0.0 for p in model.parameters()]
    return {
        "rows": int(batch.input_ids.shape[0]),
        "width": int(batch.input_ids.shape[1]),
        "tokens": batch.num_tokens,
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": statistics.median(seconds),
        "steps_s": seconds,
        "rss_before_mib": rss_before,
        "peak_rss_mib": harness.peak_rss_mib(),
        "chosen": logps[:b].tolist(),
        "rejected": logps[b:].tolist(),
        "grad_norms": grad_norms,
    }


# ---------------------------------------------------------------------------------------------
# Parent: plan, run each child, table


def dense_estimate_gib(workload: Workload, model: str) -> float:
    rows, width = workload.rows_and_width()
    layers = MODELS[model]["num_hidden_layers"]
    return rows * width * width * (1 + 4 * layers) / GIB


def run_child(args, workload: str, model: str, path: str, steps: int) -> dict:
    """One configuration in a fresh process (its own peak RSS; this one with --quick), with its status."""
    options = argparse.Namespace(workload=workload, model=model, path=path, steps=steps, warmup=args.warmup)
    if args.quick:
        return child(options) | {"status": "ok", "wall_s": 0.0, "steps": steps}
    command = [
        sys.executable,
        __file__,
        "--child",
        "--workload",
        workload,
        "--model",
        model,
        "--path",
        path,
        "--steps",
        str(steps),
        "--warmup",
        str(args.warmup),
    ]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {args.timeout} s"}
    wall = time.perf_counter() - started
    sys.stderr.write(done.stderr[-2000:])
    if done.returncode != 0 or not done.stdout.strip():
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"status": f"failed (exit {done.returncode}): {tail[:200]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(status="ok", wall_s=wall, steps=steps)
    return result


def plan(args) -> list[tuple[str, str, Optional[str], int]]:
    """(workload, model, skip reason or None, timed steps) for each configuration."""
    configs = []
    for model in args.models:
        for workload in args.workloads:
            reason = None
            if model == "100M" and workload == "32k":
                reason = (
                    "skipped: too slow on this CPU (16x the tokens of 2k, whose step takes ~25 s, and 256x its "
                    "attention work: well over 10 min per step)"
                )
            tokens = WORKLOADS[workload].pair_tokens * WORKLOADS[workload].pairs
            steps = args.big_steps if model == "100M" and tokens >= 4096 else args.steps
            configs.append((workload, model, reason, steps))
    return configs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=("dense", "layout"), help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    parser.add_argument("--workloads", type=lambda s: s.split(","), default=["short", "2k", "8k", "8k-multi", "32k"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--big-steps", type=int, default=1, help="timed steps for the 100M model on 4k+ tokens a batch")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per child")
    parser.add_argument("--dense-limit-gib", type=float, default=12.0)
    args = harness.arguments(
        parser, __file__, argv, quick=dict(models=["tiny"], workloads=["w128", "2k"], steps=1, warmup=0)
    )
    if args.child:
        print(json.dumps(child(args)))
        return

    results, params = {}, {}
    started = time.perf_counter()
    for workload, model, reason, steps in plan(args):
        for path in ("dense", "layout"):
            estimate = dense_estimate_gib(WORKLOADS[workload], model) if path == "dense" else None
            if reason:
                results[workload, model, path] = {"status": reason}
            elif estimate is not None and estimate > args.dense_limit_gib:
                results[workload, model, path] = {"status": f"skipped: dense mask estimated at {estimate:.1f} GiB"}
            else:
                print(f"{workload} / {model} / {path} ({steps} timed step(s)) ...", file=sys.stderr, flush=True)
                results[workload, model, path] = run_child(args, workload, model, path, steps)
                if "params" in results[workload, model, path]:
                    params[model] = results[workload, model, path]["params"]
    total = time.perf_counter() - started

    rows, problems = [], []
    for workload, model, _reason, _steps in plan(args):
        w = WORKLOADS[workload]
        dense, layout = results[workload, model, "dense"], results[workload, model, "layout"]
        time_ratio = mem_ratio = agree = grads = ""
        if dense.get("status") == "ok" and layout.get("status") == "ok":
            time_ratio = f"{dense['step_s'] / layout['step_s']:.2f}x"
            mem_ratio = f"{dense['peak_rss_mib'] / layout['peak_rss_mib']:.2f}x"
            a, b = dense["chosen"] + dense["rejected"], layout["chosen"] + layout["rejected"]
            delta = max(abs(x - y) for x, y in zip(a, b))
            scale = max(abs(x) for x in a)
            agree = f"{delta:.2e} ({scale:.4g})"
            grads = (
                f"{max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(dense['grad_norms'], layout['grad_norms'])):.1e}"
            )
            if delta > 1e-5 * scale + 1e-3:  # float32 sums of thousands of token log-probs
                problems.append(f"{workload} / {model}: max |dlogp| {delta:.3e} (|logp| up to {scale:.4g})")
        for path, r in (("dense", dense), ("layout", layout)):
            estimate = f" (mask est. {dense_estimate_gib(w, model):.2f} GiB)" if path == "dense" else ""
            first = path == "dense"
            if r.get("status") != "ok":
                width = w.rows_and_width()
                rows.append(
                    (
                        w.name,
                        model,
                        path,
                        f"{width[0]} x {width[1]:,}{estimate}",
                        "-",
                        r["status"],
                        "-",
                        "-",
                        "",
                        "",
                        "",
                        "",
                    )
                )
                continue
            rows.append(
                (
                    w.name,
                    model,
                    path,
                    f"{r['rows']} x {r['width']:,}{estimate}",
                    r["steps"],
                    f"{r['step_s']:.2f}",
                    f"{r['peak_rss_mib']:,.0f}",
                    f"{r['rss_before_mib']:,.0f}",
                    time_ratio if first else "",
                    mem_ratio if first else "",
                    agree if first else "",
                    grads if first else "",
                )
            )
    body = [
        "Models (Llama from config, seeded random weights, float32, sdpa, untied head): "
        + "; ".join(
            f"`{name}` = hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, {m['num_attention_heads']} "
            f"heads / {m['num_key_value_heads']} kv heads, vocab {m['vocab_size']}"
            + (f": {params[name]:,} parameters" if name in params else "")
            for name, m in MODELS.items()
            if name in args.models
        )
        + f". Median of {args.steps} timed steps after {args.warmup} warm-up ({args.big_steps} for 100M on 4k+ tokens); "
        "peak RSS is the child's `ru_maxrss`; ratios are dense / layout; dlogp is the largest |dense - layout| log-prob, "
        f"grad the largest relative difference of a parameter's gradient norm. Whole run {total / 60:.1f} min.",
        "",
        *harness.table(
            [
                "workload",
                "model",
                "path",
                "rows x row length",
                "steps",
                "step (s)",
                "peak RSS (MiB)",
                "RSS before (MiB)",
                "time dense/layout",
                "memory dense/layout",
                "max abs dlogp (max abs logp)",
                "grad norm rel. diff",
            ],
            rows,
            "llllrrrrrrll",
        ),
    ]
    if problems:
        body += ["", "Log-prob mismatches:", "", *[f"- {p}" for p in problems]]
    harness.publish("dense mask against layout attention", body, args)
    if problems:
        raise SystemExit("the dense and layout paths disagree")


if __name__ == "__main__":
    main()
