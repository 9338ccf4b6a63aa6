"""Session-scoped fixtures: a tiny Llama-style model and tokenizer built offline, and sample data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny  # noqa: E402

from dpokit import log  # noqa: E402


@pytest.fixture(autouse=True)
def default_log_level():
    """Each test starts at the default level, and a level one sets does not reach the next."""
    with log.level_restored():
        os.environ.pop(log.ENV, None)
        log.configure()
        yield


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A trained BPE tokenizer with a chat template, in HF format."""
    out = tmp_path_factory.mktemp("tokenizer")
    tiny.build_tokenizer(out, chat_template=True)
    return out


@pytest.fixture(scope="session")
def plain_tokenizer_dir(tmp_path_factory) -> Path:
    """The same tokenizer without a chat template (the plain-concatenation path)."""
    out = tmp_path_factory.mktemp("tokenizer_plain")
    tiny.build_tokenizer(out, chat_template=False)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer Llama model (hidden 64) with the chat-template tokenizer, saved in HF format."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_model")
    tiny.build_model(out, AutoTokenizer.from_pretrained(tokenizer_dir))
    return out


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """A tiny random model of every family in tests/families.py (quirks on), with the test tokenizer."""
    import families
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for name in families.FAMILIES:
        dirs[name] = root / name
        families.build_family_model(name, dirs[name], tokenizer)
    return dirs


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """An SFT-like LoRA adapter (rank 4) on the tiny model with non-zero weights, so it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def pairs_jsonl(tmp_path_factory) -> Path:
    """40 plain-format preference pairs (prompt/chosen/rejected strings) as JSONL."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in tiny.preference_rows(40)))
    return path


def tokenize_rows(tokenizer, rows: list[dict]) -> list[dict]:
    """Prompt and completion ids for plain rows via the chat template (a minimal stand-in for prepare)."""
    out = []
    for row in rows:
        messages = [{"role": "user", "content": row["prompt"]}]
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
        entry = {"prompt_ids": prompt}
        for side in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": row[side]}], tokenize=True
            )["input_ids"]
            assert list(full[: len(prompt)]) == prompt
            entry[f"{side}_ids"] = list(full[len(prompt) :])
        out.append(entry)
    return out


def write_test_prepared(out: Path, model_dir: Path, rows: list[dict], num_train: int) -> Path:
    """Tokenize `rows` with the model's chat template and write them as prepared/ (train + eval)."""
    import datasets
    from transformers import AutoTokenizer

    from dpokit.data.prepared import write_prepared

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenize_rows(tokenizer, rows)
    splits = {"train": datasets.Dataset.from_list(ids[:num_train]), "eval": datasets.Dataset.from_list(ids[num_train:])}
    manifest = {
        "source": "tests/tiny.py",
        "splits": {name: {"rows": len(ds)} for name, ds in splits.items()},
        "tokenizer": {"name": str(model_dir), "fingerprint": "test-tokenizer"},
    }
    return write_prepared(out, splits, manifest, overwrite=False)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A prepared/ directory (train: 32 arithmetic pairs, eval: 8) written with dpokit's writer."""
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    return write_test_prepared(out, tiny_model_dir, tiny.preference_rows(40), num_train=32)


@pytest.fixture(scope="session")
def style_prepared_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A prepared/ directory of kind-vs-rude pairs (train: 96, eval: 32): a signal DPO learns fast."""
    out = tmp_path_factory.mktemp("prepared_style") / "prepared"
    return write_test_prepared(out, tiny_model_dir, tiny.style_rows(128), num_train=96)


@pytest.fixture
def crash_cache_writer(monkeypatch):
    """``crash_cache_writer(after_rows=K)``: the reference cache writer raises once K rows are committed
    (as a crash mid-run would); the returned function puts the real writer back."""
    from dpokit.reference.cache import RefCacheWriter

    mark_done = RefCacheWriter.mark_done

    def install(after_rows: int):
        def mark_done_then_fail(self, group, rows):
            mark_done(self, group, rows)
            if self.rows_written >= after_rows:
                raise RuntimeError(f"simulated crash after {self.rows_written} rows")

        monkeypatch.setattr(RefCacheWriter, "mark_done", mark_done_then_fail)
        return lambda: monkeypatch.setattr(RefCacheWriter, "mark_done", mark_done)

    return install


@pytest.fixture(scope="session")
def ref_cache(tiny_model_dir, prepared_dir, tmp_path_factory) -> Path:
    """``ref.h5`` of the tiny model over `prepared_dir` (both splits), made by `dpokit ref-logps`."""
    from dpokit.cli import main

    path = tmp_path_factory.mktemp("cache") / "ref.h5"
    assert (
        main(["ref-logps", str(prepared_dir), "--model", str(tiny_model_dir), "--out", str(path), "--batch-size", "3"])
        == 0
    )
    return path


# ---------------------------------------------------------------------------------------------
# `dpokit train` arguments and runs shared by the training, fault and distributed tests


def recipe_overrides(model_dir: Path, data_dir: Path, run_dir: Path, *extra) -> list[str]:
    """The recipe's dotted overrides for a run on a tiny model and data: a live reference, no periodic eval."""
    return [
        f"model.path={model_dir}",
        f"data.path={data_dir}",
        f"output.dir={run_dir}",
        "reference.source=live",
        "training.eval_every=0",
        *map(str, extra),
    ]


def train_cli_args(model_dir: Path, data_dir: Path, run_dir: Path, *extra) -> list[str]:
    """`dpokit train --config tiny_lora` with `recipe_overrides`, then `extra` flags or overrides."""
    return ["train", "--config", "tiny_lora", *recipe_overrides(model_dir, data_dir, run_dir, *extra)]


@pytest.fixture
def train_cli(tiny_model_dir, prepared_dir):
    """``train_cli(run_dir, *extra)``: `train_cli_args` on the tiny model and `prepared_dir`."""
    return lambda run_dir, *extra: train_cli_args(tiny_model_dir, prepared_dir, run_dir, *extra)


def run_dpokit_elsewhere(argv: list[str]) -> None:
    """`dpokit ARGV` run to completion in a process of its own (several training processes, or a clean start).

    In-process, the torchelastic launcher leaves threads in the test process, and a later test that
    forks (`prepare --num-proc 2`) could then deadlock on a lock one of them held.
    """
    done = subprocess.run([sys.executable, "-m", "dpokit", *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# Full fine-tuning on 2 processes, long enough for faults to land mid-run, checkpointing every other step
# (in the background: the faults land while checkpoints are being written too);
# global batch 4 = 1 pair x 2 processes x 2 accumulation steps = 2 pairs x 2 steps on one process.
TWO_PROCESS_RUN = (
    "--max-steps",
    "12",
    "--method",
    "full",
    "--lr",
    "1e-3",
    "training.gradient_accumulation_steps=2",
    "training.save_every=2",
    "training.keep_last=2",
    "training.async_save=true",
    "eval.samples=2",
    "eval.max_new_tokens=4",
    "--gpus",
    "2",
    "data.batch_size=1",
)
ONE_PROCESS_RUN = (*TWO_PROCESS_RUN[:-3], "data.batch_size=2")  # the same run on one process


@pytest.fixture(scope="session")
def two_process_run(tiny_model_dir, prepared_dir, tmp_path_factory) -> Path:
    """An uninterrupted `TWO_PROCESS_RUN` (global batch 4): what faulted runs and one process must reproduce."""
    run = tmp_path_factory.mktemp("two_process") / "run"
    run_dpokit_elsewhere(train_cli_args(tiny_model_dir, prepared_dir, run, *TWO_PROCESS_RUN))
    return run


# ---------------------------------------------------------------------------------------------
# `dpokit ref-logps` arguments and the live values a cache must hold


def live_logps(model_dir: Path, prepared_dir: Path, adapter: Path | None = None) -> dict:
    """Per split, each pair's log-probs from full logits, one pair at a time (an independent computation)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from dpokit.data.collate import pad_pairs
    from dpokit.data.prepared import load_prepared
    from dpokit.logps import naive_sequence_logps

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)  # not merged: independent of merge_and_unload
    model.eval()
    prepared = load_prepared(prepared_dir)
    expected = {}
    for split in prepared.splits:
        rows = list(prepared.split(split))
        with torch.no_grad():
            logps = [
                naive_sequence_logps(model, b.input_ids, b.attention_mask, b.completion_mask)
                for b in (pad_pairs([row], [i], pad_id=0) for i, row in enumerate(rows))
            ]
        expected[split] = {
            "chosen_logps": np.array([float(lp[0]) for lp in logps]),
            "rejected_logps": np.array([float(lp[1]) for lp in logps]),
            "chosen_tokens": np.array([len(row["chosen_ids"]) for row in rows]),
            "rejected_tokens": np.array([len(row["rejected_ids"]) for row in rows]),
        }
    return expected


def assert_cache_equals(path: Path, expected: dict) -> None:
    """The cache at `path` holds `expected` (`live_logps`): log-probs within 1e-4, token counts exactly."""
    import numpy as np

    from dpokit.reference.cache import open_cache

    cache = open_cache(path)
    assert cache.splits == list(expected)
    for split, values in expected.items():
        got = cache.logps(split)._asdict()
        for name in ("chosen_logps", "rejected_logps"):
            np.testing.assert_allclose(got[name].numpy(), values[name], atol=1e-4, rtol=0, err_msg=f"{split}/{name}")
        for name in ("chosen_tokens", "rejected_tokens"):
            assert got[name].tolist() == values[name].tolist(), f"{split}/{name}"


def ref_logps_args(prepared: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["ref-logps", str(prepared), "--model", str(model), "--out", str(out), *extra]


def naive_token_values(model, rows):
    """Per completion token, from the model's own full logits: log p(y_t), log sum_v p(v)^2 and the entropy."""
    import torch

    from dpokit.data.collate import pad_pairs

    batch = pad_pairs(rows, list(range(len(rows))), pad_id=0)
    with torch.no_grad():
        log_probs = torch.log_softmax(
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float(), -1
        )
    mask = batch.completion_mask[:, 1:]
    chosen_ids = batch.input_ids[:, 1:]
    token_logps = log_probs[:, :-1].gather(-1, chosen_ids.unsqueeze(-1)).squeeze(-1)
    log_sq_norm = torch.logsumexp(2 * log_probs[:, :-1], -1)
    entropy = -(log_probs[:, :-1].exp() * log_probs[:, :-1]).sum(-1)
    return [[values[i][mask[i]] for i in range(mask.shape[0])] for values in (token_logps, log_sq_norm, entropy)]


MISBEHAVING_LOSSES = """
import torch
from dpokit.losses import DPOLoss


class MisbehavesAfter(DPOLoss):
    # DPO whose output goes wrong from its `after`-th call on (`spoil`), as a buggy or diverging loss would.

    def __init__(self, after: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.after, self.calls = after, 0

    def forward(self, policy, reference):
        self.calls += 1
        losses, chosen, rejected = super().forward(policy, reference)
        return (self.spoil(losses) if self.calls >= self.after else losses), chosen, rejected


class NaNAfter(MisbehavesAfter):
    def spoil(self, losses):
        return losses * float("nan")


class ScalarAfter(MisbehavesAfter):
    def spoil(self, losses):
        return losses.mean()  # the batch mean instead of per-pair values
"""


@pytest.fixture
def misbehaving_losses(tmp_path, monkeypatch) -> str:
    """The import path of a module with `NaNAfter` and `ScalarAfter` (``--loss {path}:NaNAfter loss.after=3``)."""
    (tmp_path / "misbehaving_losses.py").write_text(MISBEHAVING_LOSSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "misbehaving_losses"
