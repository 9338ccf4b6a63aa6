"""Benchmark: DPO training with dpokit (live reference, cached reference, each layout feature) against TRL.

One command runs, on the same model, data, batch size and hyperparameters, each in its own process
(so that peak memory is each variant's own), for full fine-tuning and for LoRA:

* ``dpokit live``: ``reference.source=live``, padded layout (the plain way, inside dpokit);
* ``dpokit cache``: the reference log-probs read from ``ref.h5``, padded layout;
* ``dpokit cache + group_by_length`` / ``+ packing`` / ``+ prefix_sharing``: one feature each;
* ``dpokit cache + packing + prefix_sharing``: the two that change no number, without grouping;
* ``dpokit cache + all three``: the best layout;
* ``TRL DPOTrainer``: Hugging Face TRL's default behaviour (a live reference: a frozen copy for full
  fine-tuning, the adapters switched off for LoRA), configured like dpokit (same model, beta,
  learning rate, batch size, max length, fp32, no gradient checkpointing, no eval, no saving);
* optionally (``--trl-precompute``) TRL with ``precompute_ref_log_probs=True``.

Workload (built in a temporary folder, nothing downloaded): a byte-level BPE tokenizer with a 32,000
token vocabulary trained on synthetic text, a Llama-style model from a seeded ``LlamaConfig`` (4
layers, hidden 256, intermediate 1024, 4 heads), and ``--pairs`` plain-text pairs whose prompt
(20-400 tokens) and response (10-300 tokens) lengths are drawn log-normally. The text goes through
``dpokit prepare``; TRL tokenizes the same text itself, and the bench checks that both hold the
same token ids. ``dpokit ref-logps`` runs once (its cost is reported separately) and serves both
methods, since the reference is the base model in both.

Measurement: each dpokit variant is the ``dpokit train`` command, and a step's time is the one the recipe
logs in ``metrics.jsonl`` (``pairs_per_s``: fetching and collating the batch, forward, backward,
optimizer); TRL's is the interval between consecutive ``on_step_end`` calls of a callback. The first
``--warmup`` steps are left out. Pairs/s is the timed pairs over the summed time of the timed steps.
Peak RSS is the process's ``getrusage`` maximum at its last step (dpokit's ``peak_memory_mb``; the final
checkpoint write is not counted, the whole-process peak is in the details table); on CUDA, peak allocated
CUDA memory.
TRL (``train_sampling_strategy="sequential"``) and the ungrouped dpokit variants
(``data.shuffle=false``) read the pairs in dataset order, so they time exactly the same batches and
their losses can be compared step by step; ``group_by_length`` draws its own seeded, shuffled
length-grouped batches, so its rate is also given scaled to the data set's mean pair length.
Each process uses one torch thread (``--threads``): on a shared machine a second OpenMP thread
stalls whenever another process holds its core. ``--rounds 2`` runs every dpokit variant twice,
the second time in reverse order, and pools both (TRL runs once: its gap is far above the spread).

    python bench/train_bench.py --rounds 2          # the README's headline (~33 min on 2 cores), appends to bench/train_results.md
    python bench/train_bench.py --pairs 200 --only trl,packprefix --steps 3 --warmup 1 --shape long   # TRL vs the default, minutes
    python bench/train_bench.py --methods lora --only trl,cache,best --steps 4 --out /tmp/r.md
    python bench/train_bench.py --quick             # a toy workload in seconds (TRL if installed): checks that it runs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import harness
import numpy as np

EOS, PAD = "</s>", "<pad>"
MODEL = dict(vocab=32_000, hidden=256, layers=4, words=60_000, corpus=20_000)  # the headline's workload
QUICK_MODEL = dict(vocab=1_000, hidden=64, layers=2, words=2_000, corpus=500)


# ----------------------------------------------------------------------------------------------
# Workload: tokenizer, model, text pairs, prepared data, reference cache


def synthetic_words(count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct pseudo-words built from syllables (enough distinct material for 32k BPE tokens)."""
    onsets = list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "tr", "st", "pl", "gr", "br", "qu"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]
    words: set[str] = set()
    while len(words) < count:
        syllables = rng.integers(1, 5)
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables)))
    return sorted(words)


class TextSource:
    """Zipf-distributed pseudo-words; `text(tokens)` returns text of about `tokens` tokens."""

    def __init__(self, seed: int, distinct_words: int = 60_000):
        self.rng = np.random.default_rng(seed)
        self.words = synthetic_words(distinct_words, self.rng)
        weights = 1.0 / np.arange(1, len(self.words) + 1) ** 1.05
        self.probabilities = weights / weights.sum()
        self.token_counts: Optional[np.ndarray] = None  # tokens of " word", set once a tokenizer exists

    def sample_words(self, count: int) -> np.ndarray:
        return self.rng.choice(len(self.words), size=count, p=self.probabilities)

    def corpus(self, lines: int, words_per_line: int = 40) -> list[str]:
        return [" ".join(self.words[i] for i in self.sample_words(words_per_line)) for _ in range(lines)]

    def text(self, tokens: int) -> str:
        """Words, each with its leading space, until their token count reaches `tokens`."""
        picked, total = [], 0
        while total < tokens:
            for i in self.sample_words(64):
                picked.append(self.words[i])
                total += int(self.token_counts[i])
                if total >= tokens:
                    break
        return "".join(" " + w for w in picked)


def build_tokenizer(out: Path, source: TextSource, vocab: int, lines: int) -> None:
    """Byte-level BPE with a `vocab`-token vocabulary trained on `lines` lines of synthetic text; no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(source.corpus(lines), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, model_max_length=4096)
    fast.save_pretrained(out)
    encodings = tokenizer.encode_batch([" " + w for w in source.words], add_special_tokens=False)
    source.token_counts = np.array([len(e.ids) for e in encodings])


def build_model(out: Path, hidden: int, layers: int) -> int:
    """A seeded Llama-style causal LM (intermediate 4 x hidden, heads of 64) for the tokenizer in `out`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    return harness.llama(
        out,
        len(tokenizer),
        hidden,
        layers,
        tokenizer,
        intermediate_size=4 * hidden,
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=2048,
    )


# (median, low, high) of prompt and response tokens, log-normal: the default mixed workload (the headline's),
# short pairs (about 35 tokens: 2 x prompt + both responses) and long-prompt pairs (about 350).
SHAPES = {
    "mixed": ((100, 20, 400), (70, 10, 300)),
    "short": ((10, 4, 30), (8, 3, 24)),
    "long": ((150, 80, 400), (25, 8, 80)),
}


def write_pairs(path: Path, source: TextSource, pairs: int, shape: str = "mixed") -> None:
    """Plain-format JSONL pairs whose prompt and response token counts follow `SHAPES[shape]`."""
    rng = source.rng
    prompt_shape, response_shape = SHAPES[shape]

    def lengths(median: float, low: int, high: int) -> np.ndarray:
        return np.clip(rng.lognormal(np.log(median), 0.75, pairs), low, high).astype(int)

    prompts, chosen, rejected = lengths(*prompt_shape), lengths(*response_shape), lengths(*response_shape)
    with path.open("w") as f:
        for p, c, r in zip(prompts, chosen, rejected):
            # dpokit (plain mode) and TRL both append EOS to each response; leave room for it.
            row = {"prompt": source.text(p).lstrip(), "chosen": source.text(c - 1), "rejected": source.text(r - 1)}
            f.write(json.dumps(row) + "\n")


def build_workload(work: Path, args, env: dict) -> dict:
    """Tokenizer + model in work/model, pairs.jsonl, `dpokit prepare` -> work/prepared, `ref-logps` -> work/ref.h5.

    With ``--reuse-workload``, a workload this function built earlier in `work` for as many pairs is used as it is.
    """
    record = work / "workload.json"
    if args.reuse_workload and record.is_file():
        workload = json.loads(record.read_text())
        if workload["pairs"] == args.pairs and workload.get("shape", "mixed") == args.shape:
            print(f"reusing the workload in {work}", flush=True)
            return workload
    size = QUICK_MODEL if args.quick else MODEL
    source = TextSource(seed=0, distinct_words=size["words"])
    model_dir = work / "model"
    started = time.perf_counter()
    build_tokenizer(model_dir, source, size["vocab"], size["corpus"])
    parameters = build_model(model_dir, size["hidden"], size["layers"])
    write_pairs(work / "pairs.jsonl", source, args.pairs, args.shape)
    print(
        f"workload: tokenizer, model ({parameters / 1e6:.1f}M parameters) and {args.pairs} pairs in "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )

    started = time.perf_counter()
    prepare = [
        "prepare",
        str(work / "pairs.jsonl"),
        "--model",
        str(model_dir),
        "--out",
        str(work / "prepared"),
        "--max-length",
        "1024",
    ]
    if args.quick:
        from dpokit.cli import main as dpokit_main

        assert dpokit_main(prepare) == 0
    else:
        subprocess.run([sys.executable, "-m", "dpokit", *prepare], env=env, check=True, stdout=subprocess.DEVNULL)
    prepare_seconds = time.perf_counter() - started

    print("dpokit ref-logps over all pairs ...", flush=True)
    ref = harness.measured(
        lambda: child_ref_logps(work, args.ref_batch_size),
        __file__,
        ["--child", "ref-logps", "--workdir", str(work), "--ref-batch-size", str(args.ref_batch_size)],
        args.quick,
        env=env,
    )
    print(f"  {ref['rows']} pairs in {ref['seconds']:.0f} s ({ref['rows'] / ref['seconds']:.2f} pairs/s)", flush=True)
    workload = {
        "pairs": args.pairs,
        "shape": args.shape,
        "parameters": parameters,
        "vocab": size["vocab"],
        "hidden": size["hidden"],
        "layers": size["layers"],
        "prepare_seconds": prepare_seconds,
        "ref": ref,
        "lengths": pair_length_stats(work / "prepared"),
    }
    record.write_text(json.dumps(workload))
    return workload


def prepared_lengths(prepared: Path) -> dict[str, np.ndarray]:
    """Token counts of ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` per pair of the prepared train split."""
    from dpokit.data.prepared import load_prepared, pair_token_counts

    return dict(
        zip(("prompt_ids", "chosen_ids", "rejected_ids"), pair_token_counts(load_prepared(prepared).split("train")))
    )


def pair_length_stats(prepared: Path) -> dict:
    """Percentiles (0, 10, 50, 90, 100) and mean of prompt and response token counts."""
    stats = {}
    for name, lengths in prepared_lengths(prepared).items():
        stats[name] = {str(q): int(np.percentile(lengths, q)) for q in (0, 10, 50, 90, 100)} | {
            "mean": float(lengths.mean())
        }
    return stats


def padded_pair_lengths(prepared: Path) -> np.ndarray:
    """Real tokens of each pair in the padded layout (2 x prompt + chosen + rejected), as `data.group_by_length` sorts them."""
    lengths = prepared_lengths(prepared)
    return (2 * lengths["prompt_ids"] + lengths["chosen_ids"] + lengths["rejected_ids"]).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Children: each measurement is a fresh interpreter


class StepClock:
    """What TRL's callback records at the end of every optimizer step: wall clock, peak RSS, loss."""

    def __init__(self):
        self.ends, self.rss, self.losses, self.begins = [], [], [], []

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        self.rss.append(harness.peak_rss_mib())

    def result(self) -> dict:
        import torch

        cuda = torch.cuda.is_available()
        # Step 1 from its begin; every later step from the end of the one before.
        seconds = [b - a for a, b in zip(self.begins[:1] + self.ends, self.ends)]
        return {
            "seconds": seconds,
            "rss_mb": self.rss,
            "losses": self.losses,
            "begins": self.begins,
            "ends": self.ends,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        }


def child_ref_logps(work: Path, batch_size: int) -> dict:
    """The real reference pass (`compute_reference_cache`, what `dpokit ref-logps` runs), over every pair."""
    from dpokit.host_memory import configure_host_memory

    configure_host_memory()  # before torch is imported, as the `dpokit` command does (`dpokit.cli.entry`)
    from dpokit.reference.compute import compute_reference_cache

    options = harness.reference_options(work, batch_size)
    (report,) = compute_reference_cache(options)
    return {
        "rows": report.rows_computed,
        "tokens": report.tokens,
        "seconds": report.seconds,
        "peak_rss_mb": harness.peak_rss_mib(),
    }


def child_trl(work: Path, method: str, batch_size: int, steps: int, lr: float, beta: float, precompute: bool) -> dict:
    """TRL's DPOTrainer on the same text, model and settings; step ends recorded by a callback."""
    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    cuda = torch.cuda.is_available()
    config = DPOConfig(
        output_dir=str(work / "trl_out" / method),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=beta,
        loss_type=["sigmoid"],
        max_length=1024,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=batch_size,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=not cuda,
        model_init_kwargs={"dtype": torch.float32},
        train_sampling_strategy="sequential",
        seed=42,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    peft_config = None
    if method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    setup_started = time.perf_counter()
    trainer = DPOTrainer(
        model=str(work / "model"),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Clock()],
    )
    setup_seconds = time.perf_counter() - setup_started
    trainer.train()
    return clock.result() | {
        "setup_seconds": setup_seconds,
        "same_token_ids": same_token_ids(trainer.train_dataset, work / "prepared"),
    }


def same_token_ids(trl_dataset, prepared: Path) -> bool:
    """Whether TRL's tokenization of the text equals `dpokit prepare`'s, row by row."""
    from dpokit.data.prepared import load_prepared

    ours = load_prepared(prepared).split("train")
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    if len(ours) != len(trl_dataset):
        return False
    return all(list(ours[c]) == list(trl_dataset[c]) for c in columns)


def run_measured(command: list[str], env: dict, log: Path) -> tuple[float, float, str]:
    """Run `command`; returns (wall seconds, peak RSS MiB of the whole process from wait4, stdout)."""
    started = time.perf_counter()
    with log.open("w") as stderr, tempfile.TemporaryFile("w+") as stdout:
        process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        output = stdout.read()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(command)} failed (exit {process.returncode}); see {log}:\n{log.read_text()[-4000:]}"
        )
    return seconds, usage.ru_maxrss / 1024, output


# ----------------------------------------------------------------------------------------------
# Variants


@dataclass
class Variant:
    key: str  # short name for --only
    name: str
    kind: str  # "dpokit" or "trl"
    overrides: list[str] = field(default_factory=list)  # dpokit: key=value; trl: ["precompute"] or []

    @property
    def grouped(self) -> bool:
        return "data.group_by_length=true" in self.overrides


def variants(trl_precompute: bool) -> list[Variant]:
    cache = ["reference.source=cache"]
    padded = ["data.packing=false", "data.prefix_sharing=false"]  # the layout defaults are the fast ones
    plain = ["data.shuffle=false", *padded]  # dataset order: the same batches as TRL's sequential sampler
    grouped = ["data.shuffle=true", "data.group_by_length=true", *padded]
    chosen = [
        Variant("trl", "TRL DPOTrainer (live reference)", "trl"),
        Variant("live", "dpokit live reference, padded", "dpokit", ["reference.source=live", *plain]),
        Variant("cache", "dpokit cache, padded", "dpokit", [*cache, *plain]),
        Variant("group", "dpokit cache + group_by_length", "dpokit", [*cache, *grouped]),
        Variant("packing", "dpokit cache + packing", "dpokit", [*cache, *plain, "data.packing=true"]),
        Variant("prefix", "dpokit cache + prefix_sharing", "dpokit", [*cache, *plain, "data.prefix_sharing=true"]),
        Variant(
            "packprefix",
            "dpokit cache + packing + prefix_sharing",
            "dpokit",
            [*cache, *plain, "data.packing=true", "data.prefix_sharing=true"],
        ),
        Variant(
            "best",
            "dpokit cache + all three (best layout)",
            "dpokit",
            [*cache, *grouped, "data.packing=true", "data.prefix_sharing=true"],
        ),
    ]
    if trl_precompute:
        chosen.insert(1, Variant("trl-precompute", "TRL DPOTrainer, precompute_ref_log_probs", "trl", ["precompute"]))
    return chosen


def step_count(variant: Variant, args) -> int:
    """Timed steps: length-grouped variants draw random batches of very different lengths, so they get more."""
    return args.grouped_steps if variant.grouped else args.steps


def timed_pairs(variant: Variant, args, pair_lengths: np.ndarray) -> list[int]:
    """Example indices of the timed steps, as the variant's sampler hands them out.

    Dataset order for TRL (``train_sampling_strategy="sequential"``) and dpokit with ``data.shuffle=false``;
    for ``group_by_length`` the recipe's own seeded `PairSampler`, rebuilt here.
    """
    from dpokit.data.sampler import PairSampler

    steps = args.warmup + step_count(variant, args)
    if not variant.grouped:
        return list(range(args.warmup * args.batch_size, steps * args.batch_size))
    sampler = PairSampler(len(pair_lengths), args.batch_size, seed=42, shuffle=True, lengths=pair_lengths.tolist())
    batches = [sampler.step_indices(step)[0] for step in range(steps)]
    return [i for batch in batches[args.warmup :] for i in batch]


def dpokit_command(work: Path, variant: Variant, method: str, args, run_dir: Path) -> list[str]:
    """The `dpokit train` overrides of a variant."""
    overrides = [
        f"data.path={work / 'prepared'}",
        f"model.path={work / 'model'}",
        f"reference.cache={work / 'ref.h5'}",
        f"model.method={method}",
        "model.dtype=float32",
        f"data.batch_size={args.batch_size}",
        f"training.max_steps={args.warmup + step_count(variant, args)}",
        f"optimizer.lr={args.lr}",
        f"loss.beta={args.beta}",
        "lora.rank=8",
        "lora.alpha=16",
        "training.seed=42",
        f"output.dir={run_dir}",
        "output.overwrite=true",
        *variant.overrides,
    ]
    return overrides


def measure_dpokit(work: Path, variant: Variant, method: str, args, env: dict) -> dict:
    """One `dpokit train` run (the command; in this process with --quick): its steps as the recipe logs them."""
    name = f"{method}-{slug(variant.name)}"
    run_dir = work / "runs" / name
    overrides = dpokit_command(work, variant, method, args, run_dir) + args.dpokit_args.split()
    if args.quick:
        started = time.perf_counter()
        harness.dpokit_train(overrides, quick=True)
        wall, process_rss = time.perf_counter() - started, harness.peak_rss_mib()
    else:
        command = [sys.executable, "-m", "dpokit", "train", "--config", "tiny_lora", *overrides]
        wall, process_rss, _ = run_measured(command, env, work / "logs" / f"{name}.log")
    steps = harness.train_records(run_dir)
    peak = steps[-1]["peak_memory_mb"]  # on CUDA the allocator's peak, else the process's ru_maxrss
    cuda = args.cuda
    clock = {
        "seconds": [args.batch_size / r["pairs_per_s"] for r in steps],
        "losses": [r["loss"] for r in steps],
        "rss_mb": [None if cuda else peak],
        "cuda_peak_mb": peak if cuda else None,
    }
    return timed_run(clock, args, wall, process_rss)


def measure_trl(work: Path, variant: Variant, method: str, args, env: dict) -> dict:
    """One run of TRL's DPOTrainer in a child (see `child_trl`; in this process with --quick)."""
    steps = args.warmup + step_count(variant, args)
    precompute = "precompute" in variant.overrides
    if args.quick:
        started = time.perf_counter()
        clock = child_trl(work, method, args.batch_size, steps, args.lr, args.beta, precompute)
        wall, process_rss = time.perf_counter() - started, harness.peak_rss_mib()
    else:
        child = [
            sys.executable,
            __file__,
            "--child",
            "trl",
            "--workdir",
            str(work),
            "--method",
            method,
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(steps),
            "--lr",
            str(args.lr),
            "--beta",
            str(args.beta),
        ] + (["--precompute"] if precompute else [])
        if args.trl_host_memory:  # dpokit's host-memory settings for TRL's process too (TRL as shipped has neither)
            from dpokit.host_memory import add_host_memory_settings

            env = dict(env)
            add_host_memory_settings(env)
        wall, process_rss, output = run_measured(child, env, work / "logs" / f"{method}-{slug(variant.name)}.log")
        clock = json.loads(output.strip().splitlines()[-1])
    in_step = [e - b for b, e in zip(clock["begins"], clock["ends"])]
    return timed_run(clock, args, wall, process_rss) | {
        "begin_to_end_s": sum(in_step[args.warmup :]),
        "same_token_ids": clock["same_token_ids"],
        "setup_seconds": clock["setup_seconds"],
    }


def timed_run(clock: dict, args, wall: float, process_rss: float) -> dict:
    """A run's timed steps: those after the first ``--warmup``."""
    return {
        "seconds": clock["seconds"][args.warmup :],
        "peak_rss_mb": clock["rss_mb"][-1],
        "cuda_peak_mb": clock["cuda_peak_mb"],
        "losses": clock["losses"],
        "process_peak_rss_mb": process_rss,
        "wall_s": wall,
    }


def summarise(variant: Variant, method: str, runs: list[dict], args) -> dict:
    """A variant's row from its runs (rounds): rates over all their timed steps together, the largest peak memory."""
    pairs = timed_pairs(variant, args, args.pair_lengths)
    for run in runs:
        if len(pairs) != len(run["seconds"]) * args.batch_size:
            raise RuntimeError(f"{variant.name}: {len(run['seconds'])} timed steps for {len(pairs)} timed pairs")
    seconds = [s for run in runs for s in run["seconds"]]
    total = sum(seconds)
    pairs_per_s = len(pairs) * len(runs) / total
    timed_length = float(args.pair_lengths[pairs].mean())

    def peak(key: str) -> Optional[float]:
        return None if runs[0][key] is None else max(run[key] for run in runs)

    return runs[0] | {
        "key": variant.key,
        "variant": variant.name,
        "kind": variant.kind,
        "method": method,
        "steps": len(seconds),
        "rounds": len(runs),
        "round_pairs_per_s": [len(pairs) / sum(run["seconds"]) for run in runs],
        "pairs_per_s": pairs_per_s,
        "median_step_s": statistics.median(seconds),
        "timed_seconds": total,
        "timed_pair_length": timed_length,
        # The rate at the data set's mean pair length, assuming time grows with real tokens.
        "adjusted_pairs_per_s": pairs_per_s * timed_length / float(args.pair_lengths.mean()),
        "peak_rss_mb": peak("peak_rss_mb"),
        "process_peak_rss_mb": peak("process_peak_rss_mb"),
        "cuda_peak_mb": peak("cuda_peak_mb"),
        "wall_s": sum(run["wall_s"] for run in runs),
        "load_at_start": statistics.mean(run["load_at_start"] for run in runs),
    }


def run_all(work: Path, args, env: dict) -> list[dict]:
    """Every chosen variant for every method; dpokit variants `--rounds` times, later rounds in reverse order."""
    only = {w.strip() for w in args.only.split(",") if w.strip()}
    rows = []
    for method in args.methods:
        chosen = [v for v in variants(args.trl_precompute) if not only or v.key in only]
        runs: dict[str, list[dict]] = {v.key: [] for v in chosen}
        for round_number in range(args.rounds):
            order = chosen if round_number % 2 == 0 else chosen[::-1]
            for variant in order:
                if variant.kind == "trl" and round_number > 0:
                    continue  # TRL runs once: its gap to dpokit is far above the round-to-round spread
                measure = measure_trl if variant.kind == "trl" else measure_dpokit
                load = os.getloadavg()[0]
                run = measure(work, variant, method, args, env) | {"load_at_start": load}
                runs[variant.key].append(run)
                print(
                    f"{method:4} round {round_number + 1} | {variant.name:42} | "
                    f"{len(run['seconds']) * args.batch_size / sum(run['seconds']):6.2f} pairs/s | "
                    f"peak {run['cuda_peak_mb'] or run['peak_rss_mb']:6.0f} MiB | load {load:.1f}",
                    flush=True,
                )
        rows += [summarise(v, method, runs[v.key], args) for v in chosen]
    return rows


def slug(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


# ----------------------------------------------------------------------------------------------
# Report


def find(rows: list[dict], method: str, key: str) -> Optional[dict]:
    """The row of variant `key` (see `variants`) for `method`, if it ran."""
    return next((r for r in rows if r["method"] == method and r["key"] == key), None)


def results_table(rows: list[dict], method: str, cuda: bool) -> list[str]:
    trl = find(rows, method, "trl")
    table = []
    for r in (r for r in rows if r["method"] == method):
        peak = r["cuda_peak_mb"] if cuda else r["peak_rss_mb"]
        trl_peak = (trl["cuda_peak_mb"] if cuda else trl["peak_rss_mb"]) if trl else None
        table.append(
            (
                r["variant"],
                f"{r['pairs_per_s']:.2f}",
                f"{r['median_step_s']:.2f}",
                f"{peak:,.0f}",
                f"{r['pairs_per_s'] / trl['pairs_per_s']:.2f}x" if trl else "-",
                f"{peak / trl_peak:.2f}x" if trl_peak else "-",
                f"{r['timed_pair_length']:.0f}",
                f"{r['adjusted_pairs_per_s']:.2f}",
                f"{r['load_at_start']:.1f}",
            )
        )
    header = [
        "variant",
        "pairs/s",
        "median step (s)",
        "peak CUDA (MiB)" if cuda else "peak RSS (MiB)",
        "speedup vs TRL",
        "memory vs TRL",
        "timed pairs: mean tokens",
        "pairs/s at mean length",
        "load at start",
    ]
    return harness.table(header, table, "lrrrrrrrr")


def contributions(rows: list[dict], method: str) -> list[str]:
    """Each feature's gain, from the length-adjusted rates (the same pairs for every ungrouped variant)."""
    live, cache = find(rows, method, "live"), find(rows, method, "cache")
    if live is None or cache is None:
        return []

    def rate(r: dict) -> float:
        return r["adjusted_pairs_per_s"]

    def peak(r: dict) -> float:
        return r["cuda_peak_mb"] or r["peak_rss_mb"]

    lines = [
        f"- the cache instead of a live reference (both padded): {rate(cache) / rate(live):.2f}x pairs/s, "
        f"peak memory {peak(cache) - peak(live):+,.0f} MiB"
    ]
    for key, words in (
        ("group", "group_by_length"),
        ("packing", "packing"),
        ("prefix", "prefix_sharing"),
        ("packprefix", "packing + prefix_sharing"),
        ("best", "all three"),
    ):
        r = find(rows, method, key)
        if r is not None:
            lines.append(
                f"- {words} on top of the cache: {rate(r) / rate(cache):.2f}x pairs/s, "
                f"peak memory {peak(r) - peak(cache):+,.0f} MiB"
            )
    best = max((r for r in rows if r["method"] == method and r["kind"] == "dpokit"), key=rate)
    lines.append(f"- fastest dpokit layout here (length-adjusted): **{best['variant']}**")
    return lines


def report(rows: list[dict], workload: dict, args) -> list[str]:
    """The run's section below its dated header: workload, one table per method, contributions, details."""
    ref = workload["ref"]
    lengths = workload["lengths"]
    lines = [
        f"Workload: Llama-style model ({workload['parameters'] / 1e6:.1f}M parameters: {workload['layers']} layers, "
        f"hidden {workload['hidden']}, vocabulary {workload['vocab']:,}, untied head), fp32, SDPA attention; "
        f"{args.pairs:,} {args.shape} pairs; tokens per prompt p10/p50/p90/max {fmt_lengths(lengths['prompt_ids'])} "
        f"(mean {lengths['prompt_ids']['mean']:.0f}), per response {fmt_lengths(lengths['chosen_ids'])} (mean "
        f"{lengths['chosen_ids']['mean']:.0f}); a pair is {args.pair_lengths.mean():.0f} real tokens on average "
        f"(2 x prompt + both responses). Every variant: batch {args.batch_size} pairs, lr {args.lr:g}, beta "
        f"{args.beta:g}, DPO sigmoid loss, AdamW, cosine schedule, grad-norm clip 1.0, max length 1024, LoRA r 8 / "
        f"alpha 16 on all linear layers, {args.threads} torch thread(s) per process. {args.warmup} warm-up steps, then "
        f"{args.steps} timed steps ({args.grouped_steps} for the length-grouped variants); each dpokit variant ran "
        f"{args.rounds} time(s), later rounds in reverse order; TRL ran once. Versions: trl {harness.installed('trl')}, "
        f"peft {harness.installed('peft')}.",
        "",
        f"Reference pass (`dpokit ref-logps`, batch {args.ref_batch_size}): {ref['rows']:,} pairs in "
        f"{ref['seconds']:.0f} s = {ref['rows'] / ref['seconds']:.2f} pairs/s ({ref['tokens'] / ref['seconds']:,.0f} "
        f"tokens/s), peak RSS {ref['peak_rss_mb']:,.0f} MiB. `dpokit prepare`: {workload['prepare_seconds']:.0f} s.",
        "",
    ]
    for method in args.methods:
        lines += [
            f"{'Full fine-tuning' if method == 'full' else 'LoRA'}:",
            "",
            *results_table(rows, method, args.cuda),
            "",
        ]
        for part in (total_lines(rows, method, ref), contributions(rows, method)):
            lines += [*part, ""] if part else []
    details = [
        (
            r["method"],
            r["variant"],
            r["steps"],
            " / ".join(f"{rate:.2f}" for rate in r["round_pairs_per_s"]),
            f"{r['timed_seconds']:.1f}",
            f"{r['wall_s']:.0f}",
            f"{r['process_peak_rss_mb']:,.0f}",
            f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f}",
        )
        for r in rows
    ]
    lines += harness.table(
        [
            "method",
            "variant",
            "timed steps (all rounds)",
            "pairs/s per round",
            "timed s",
            "wall s (whole processes)",
            "peak RSS whole process (MiB)",
            "loss step 1 / last",
        ],
        details,
        "llrlrrrl",
    )
    return lines + [""] + trl_checks(rows)


def trl_checks(rows: list[dict]) -> list[str]:
    """Same tokens, same losses on the same batches, and how TRL's step time splits."""
    lines = []
    for trl in (r for r in rows if r["kind"] == "trl"):
        lines.append(
            f"- TRL {trl['method']} ({trl['variant']}): token ids "
            f"{'identical to' if trl['same_token_ids'] else 'DIFFERENT from'} `dpokit prepare`'s for every "
            f"pair; {trl['begin_to_end_s']:.1f} s of its {trl['timed_seconds']:.1f} timed seconds are inside "
            f"steps (on_step_begin to on_step_end); trainer setup (tokenizing, loading) {trl['setup_seconds']:.0f} s."
        )
        same = find(rows, trl["method"], "cache")
        if same is not None:
            n = min(len(same["losses"]), len(trl["losses"]))
            gap = max(abs(a - b) for a, b in zip(same["losses"][:n], trl["losses"][:n]))
            lines.append(
                f"  Largest per-step loss difference from dpokit cache, padded over the same {n} batches: {gap:.1e}."
            )
    return lines


def fmt_lengths(stats: dict) -> str:
    return f"{stats['10']}/{stats['50']}/{stats['90']}/{stats['100']}"


def total_lines(rows: list[dict], method: str, ref: dict) -> list[str]:
    """One epoch over all pairs, with the reference pass added to the cached variants."""
    trl = find(rows, method, "trl")
    best = find(rows, method, "best")
    if trl is None or best is None:
        return []
    n = ref["rows"]
    ref_s = ref["seconds"]
    trl_s = n / trl["adjusted_pairs_per_s"]
    best_s = n / best["adjusted_pairs_per_s"]
    return [
        f"One epoch over the {n:,} pairs at the length-adjusted rates: TRL {trl_s / 60:.1f} min; dpokit best layout "
        f"{best_s / 60:.1f} min + {ref_s / 60:.1f} min for the reference pass = {(best_s + ref_s) / 60:.1f} min "
        f"({trl_s / (best_s + ref_s):.1f}x TRL with the pass counted; the pass is paid once and reused by every later "
        "run, epoch and sweep on the same data and reference)."
    ]


# ----------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000, help="pairs in the data set")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="mixed",
        help="pair lengths: mixed (the headline's), short (~35 tokens a pair) or long (long prompts, ~350)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step (every variant)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--grouped-steps", type=int, default=15, help="timed steps of the length-grouped variants")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first and left out of the timing")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of each dpokit variant, interleaved (round 2 in reverse order); rates pool all rounds",
    )
    parser.add_argument("--ref-batch-size", type=int, default=16, help="pairs per forward of the reference pass")
    parser.add_argument("--methods", default="full,lora", help="comma-separated: full, lora")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated variants to run: trl, trl-precompute, live, cache, group, packing, prefix, "
        "packprefix, best",
    )
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (1: on a shared machine a second OpenMP thread stalls whenever "
        "another process holds its core)",
    )
    parser.add_argument(
        "--trl-host-memory",
        action="store_true",
        help="give TRL's process dpokit's host-memory settings (huge pages, fixed mmap threshold; "
        "dpokit.host_memory) to see how much of the gap they are",
    )
    parser.add_argument("--trl-precompute", action="store_true", help="also run TRL with precompute_ref_log_probs=True")
    parser.add_argument("--workdir", type=Path, help="keep the workload and runs here (default: a temporary folder)")
    parser.add_argument("--reuse-workload", action="store_true", help="use the workload already built in --workdir")
    parser.add_argument(
        "--dpokit-args",
        default="",
        help="extra dotted overrides for every dpokit run, e.g. 'training.compile=true' (space-separated)",
    )
    parser.add_argument("--child", choices=["ref-logps", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    args = harness.arguments(
        parser,
        __file__,
        argv,
        quick=dict(pairs=16, shape="short", batch_size=2, steps=1, grouped_steps=1, warmup=1),
        quick_help="16 short pairs on a 2-layer model, 1 + 1 steps, TRL (if installed) against "
        "dpokit's default layout, every run in this process: checks that it runs",
    )

    if args.child:  # one measurement in this fresh interpreter, printed as JSON on the last line
        if args.child == "ref-logps":
            result = child_ref_logps(args.workdir, args.ref_batch_size)
        else:
            result = child_trl(
                args.workdir, args.method, args.batch_size, args.steps, args.lr, args.beta, args.precompute
            )
        print(json.dumps(result))
        return

    if args.quick:
        args.only = args.only or "trl,packprefix"
    only = [key for key in args.only.split(",") if key.strip()]
    if any(key.startswith("trl") for key in only) and importlib.util.find_spec("trl") is None:
        print("TRL is not installed (pip install -e '.[bench]'): its variants are skipped", flush=True)
        args.only = ",".join(key for key in only if not key.startswith("trl")) or "packprefix"
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    import torch

    args.cuda = torch.cuda.is_available()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "PYTHONWARNINGS": "ignore",
        "TQDM_DISABLE": "1",
    }
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        work = args.workdir or Path(tmp)
        (work / "logs").mkdir(parents=True, exist_ok=True)
        workload = build_workload(work, args, env)
        args.pair_lengths = padded_pair_lengths(work / "prepared")
        rows = run_all(work, args, env)
    harness.publish("dpokit against TRL's DPOTrainer", report(rows, workload, args), args)


if __name__ == "__main__":
    main()
