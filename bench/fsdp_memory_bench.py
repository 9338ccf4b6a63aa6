"""Benchmark: memory per rank of full fine-tuning with 1 and with 2 processes (FSDP2).

Full fine-tuning with AdamW holds, per parameter, the weight, its gradient and two optimizer
moments (16 bytes in float32). FSDP2 shards all four across ranks, so each rank of a 2-process run
should hold about half of that, plus one gathered layer at a time. Both runs use the same global
batch (per-device batch x processes) on the same model and data; each runs `dpokit train` in its
own processes, on CPU with gloo here (NCCL on CUDA). Peak memory is rank 0's peak resident set size
as the recipe logs it (`peak_memory_mb` in metrics.jsonl), which includes loading the model.

    python bench/fsdp_memory_bench.py                 # ~170M parameters, writes bench/fsdp_memory_results.md
    python bench/fsdp_memory_bench.py --layers 2      # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def build_model(out: Path, vocab: int, hidden: int, layers: int) -> int:
    """A seeded Llama-style model plus a 32k word-level tokenizer; returns the parameter count."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, max_position_embeddings=4096,
        tie_word_embeddings=False, pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    vocabulary = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="<pad>")), pad_token="<pad>", eos_token="<eos>"
    )
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def build_prepared(out: Path, pairs: int, vocab: int, length: int, seed: int = 0) -> None:
    import datasets

    from dpokit.data.prepared import write_prepared

    rng = np.random.default_rng(seed)
    rows = [
        {
            "prompt_ids": rng.integers(2, vocab, length // 2).tolist(),
            "chosen_ids": rng.integers(2, vocab, length // 2).tolist(),
            "rejected_ids": rng.integers(2, vocab, length // 2).tolist(),
        }
        for _ in range(pairs)
    ]
    manifest = {"source": "bench", "splits": {"train": {"rows": pairs}}, "tokenizer": {"name": "bench", "fingerprint": "bench"}}
    write_prepared(out, {"train": datasets.Dataset.from_list(rows)}, manifest, overwrite=True)


def run_train(workdir: Path, processes: int, global_batch: int, steps: int) -> dict:
    run_dir = workdir / f"run_{processes}"
    command = [
        sys.executable, "-m", "dpokit", "train", "--config", "tiny_lora", "--gpus", str(processes),
        f"model.path={workdir / 'model'}", f"data.path={workdir / 'prepared'}", f"output.dir={run_dir}",
        "model.method=full", "reference.source=live", f"training.max_steps={steps}", "training.eval_every=0",
        f"data.batch_size={global_batch // processes}", "output.overwrite=true",
    ]
    # Only the policy's memory is of interest: a live reference would add a frozen copy per rank,
    # so use a reference-free loss (SimPO) for the memory comparison.
    command += ["loss={name: simpo}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    return {"processes": processes, "peak_mb": max(r["peak_memory_mb"] for r in train), "seconds": seconds,
            "loss": train[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence (prompt + completion)")
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "fsdp_memory_results.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        params = build_model(workdir / "model", args.vocab, args.hidden, args.layers)
        build_prepared(workdir / "prepared", args.global_batch * args.steps, args.vocab, args.length)
        results = [run_train(workdir, n, args.global_batch, args.steps) for n in (1, 2)]

    state_mb = params * 16 / 2**20  # weight + gradient + two AdamW moments, float32
    lines = [
        "# Full fine-tuning memory per rank: 1 vs 2 processes (FSDP2)",
        "",
        f"Command: `python bench/fsdp_memory_bench.py --layers {args.layers} --hidden {args.hidden} "
        f"--vocab {args.vocab} --length {args.length} --global-batch {args.global_batch} --steps {args.steps}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only (gloo); "
        f"load average at the end {os.getloadavg()[0]:.1f}.",
        f"Model: Llama-style, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: "
        f"{params / 1e6:.0f}M parameters; weights + grads + AdamW state = {state_mb:.0f} MB in float32.",
        "",
        "| processes | per-device batch | peak RSS per rank (MB) | vs 1 process | wall time (s) | last loss |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    base = results[0]["peak_mb"]
    for r in results:
        lines.append(
            f"| {r['processes']} | {args.global_batch // r['processes']} | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] / base:.2f}x | {r['seconds']:.0f} | {r['loss']:.4f} |"
        )
    lines += [
        "",
        "Peak RSS is rank 0's, as logged by the recipe; it includes the Python/torch runtime (~0.5 GB) and "
        "the moment each rank loads the full model before sharding it. Wall time includes process start-up "
        "and, for 2 processes on 2 CPU cores, gloo communication: CPU runs show memory, not speed.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
