"""`dpokit train` on one process: methods, losses, checkpoints, resume, learning, errors."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import recipe_overrides as overrides

from dpokit.cli import main
from dpokit.config import load_config
from dpokit.launch import builtin_recipe_path, load_recipe_module
from dpokit.metrics import PAIR_METRICS, read_metrics

RECIPE = load_recipe_module(builtin_recipe_path())


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, "train")]


def run_recipe(args: list[str]):
    """Build, train and return the recipe object (for in-memory comparisons)."""
    recipe = RECIPE.DPORecipe(load_config("tiny_lora", args))
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return recipe


def test_first_step_has_zero_rewards_and_dpo_loss_ln2(tiny_model_dir, prepared_dir, tmp_path):
    assert (
        main(
            [
                "train",
                "--config",
                "tiny_lora",
                *overrides(tiny_model_dir, prepared_dir, tmp_path / "run"),
                "training.max_steps=1",
            ]
        )
        == 0
    )
    first = read_metrics(tmp_path / "run", "train")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    for key in (*PAIR_METRICS, "lr", "grad_norm", "tokens_per_s", "pairs_per_s", "peak_memory_mb"):
        assert key in first


@pytest.mark.parametrize("method", ["full", "lora", "dora", "qlora"])
def test_each_method_reduces_the_loss_on_a_fixed_batch(method, tiny_model_dir, prepared_dir, tmp_path):
    # One global batch = the whole 32-pair train split, so every step sees the same fixed batch.
    lr = "1e-3" if method == "full" else "1e-2"
    args = overrides(
        tiny_model_dir,
        prepared_dir,
        tmp_path / "run",
        f"model.method={method}",
        "training.max_steps=3",
        "data.shuffle=false",
        "data.batch_size=32",
        f"optimizer.lr={lr}",
        "scheduler.name=constant",
        "scheduler.warmup_steps=0",
    )
    assert main(["train", "--config", "tiny_lora", *args]) == 0
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 3
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert losses[2] < losses[1] < losses[0]


def test_saved_adapter_reloads_with_peft_and_gives_the_same_logits(tiny_model_dir, prepared_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = run_recipe(
        overrides(
            tiny_model_dir,
            prepared_dir,
            tmp_path / "run",
            "training.max_steps=2",
            "optimizer.lr=1e-2",
            "training.save_every=1",
            "training.keep_last=2",
        )
    )
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    for step in (1, 2):  # every adapter checkpoint carries the tokenizer, loaded when the first is written
        assert (tmp_path / "run" / "checkpoints" / f"step_000000{step}" / "tokenizer_config.json").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(checkpoint)).eval()
    inputs = torch.tensor([[3, 40, 41, 42, 5, 4, 50, 51]])
    recipe.policy.eval()
    with torch.no_grad():
        expected = recipe.policy(input_ids=inputs).logits
        got = reloaded(input_ids=inputs).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-3  # the adapter changed something


def test_saved_full_model_reloads_with_transformers_and_gives_the_same_logits(
    tiny_model_dir, prepared_dir, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded_at = []  # the recipe's step whenever it loads the tokenizer: only for the final, full checkpoint
    original = AutoTokenizer.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        loaded_at.append(recipe.step)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(from_pretrained))
    recipe = RECIPE.DPORecipe(
        load_config(
            "tiny_lora",
            overrides(
                tiny_model_dir,
                prepared_dir,
                tmp_path / "run",
                "model.method=full",
                "training.max_steps=2",
                "optimizer.lr=1e-3",
                "training.save_every=1",
                "eval.samples=0",
            ),
        )
    )
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    monkeypatch.undo()
    assert loaded_at == [2]
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000002"
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    AutoTokenizer.from_pretrained(checkpoint)  # the tokenizer travels with the model
    inputs = torch.tensor([[3, 40, 41, 42, 5, 4, 50, 51]])
    recipe.policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=inputs).logits, recipe.policy(input_ids=inputs).logits, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    "method, loss, extra",
    [
        ("lora", "dpo", ()),
        ("full", "dpo", ()),
        ("lora", "bco", ()),  # a running mean in the loss
        ("lora", "dpo", ("lora.dropout=0.1",)),  # dropout draws from the RNG every step
    ],
)
def test_resume_after_step_4_continues_with_the_same_losses(
    method, loss, extra, tiny_model_dir, prepared_dir, tmp_path
):
    common = [
        f"model.method={method}",
        "training.max_steps=8",
        "data.batch_size=2",
        "optimizer.lr=1e-3",
        "training.save_every=4",
        "training.keep_last=5",
        "--loss",
        loss,
        *extra,
    ]
    straight = tmp_path / "straight"
    assert main(["train", "--config", "tiny_lora", *overrides(tiny_model_dir, prepared_dir, straight, *common)]) == 0
    # A run "killed" after step 4: its directory as it stood then (checkpoint 4, metrics to step 4, plus junk).
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000008")
    (resumed / "checkpoints" / ".step_0000006.tmp-4194304").mkdir()  # a dead writer's half-written checkpoint
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(lines[:5]) + "\n")
    assert (
        main(["train", "--config", "tiny_lora", *overrides(tiny_model_dir, prepared_dir, resumed, *common), "--resume"])
        == 0
    )
    want, got = train_losses(straight), train_losses(resumed)
    assert len(got) == 8
    assert got == pytest.approx(want, abs=1e-6)


def test_sixty_steps_of_dpo_raise_eval_reward_accuracy(tiny_model_dir, style_prepared_dir, tmp_path):
    args = overrides(
        tiny_model_dir, style_prepared_dir, tmp_path / "run", "training.max_steps=60", "training.eval_every=30"
    )
    assert main(["train", "--config", "tiny_lora", *args]) == 0
    evals = read_metrics(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [30, 60]
    assert evals[-1]["rewards/accuracies"] >= 0.9
    assert evals[-1]["rewards/margins"] > 0.3


def simpo_step_one_loss(model_dir, data_dir, beta: float, gamma: float) -> float:
    """SimPO's loss on the whole train split (batch = split, in order), from the model's own logits."""
    from transformers import AutoModelForCausalLM

    from dpokit.data.collate import pad_pairs
    from dpokit.data.prepared import load_prepared
    from dpokit.logps import naive_sequence_logps

    rows = list(load_prepared(data_dir).split("train"))
    batch = pad_pairs(rows, list(range(len(rows))), pad_id=0)
    with torch.no_grad():
        logps = naive_sequence_logps(
            AutoModelForCausalLM.from_pretrained(model_dir),
            batch.input_ids,
            batch.attention_mask,
            batch.completion_mask,
        )
    counts = batch.completion_mask[:, 1:].sum(-1).double()
    average = logps.double() / counts
    chosen, rejected = average[: len(rows)], average[len(rows) :]
    return float(torch.nn.functional.softplus(-(beta * (chosen - rejected) - gamma)).mean())


# At step 1 the policy is the reference (h = 0): hinge 1 - gamma*0 = 1, IPO (0 - 1/(2 tau))^2 = 25.
@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--loss", "rso", "--gamma", "0.5"], lambda model, data: 1.0),
        (["--loss", "ipo", "--tau", "0.1"], lambda model, data: 25.0),
        (
            ["--loss", "simpo", "--beta", "2.5", "--gamma", "0.3"],
            lambda model, data: simpo_step_one_loss(model, data, 2.5, 0.3),
        ),
    ],
    ids=["rso", "ipo", "simpo"],
)
def test_each_loss_flag_computes_its_formula_at_step_one(flags, expected, tiny_model_dir, prepared_dir, tmp_path):
    args = [
        "train",
        "--config",
        "tiny_lora",
        "--max-steps",
        "1",
        "--batch-size",
        "32",
        *flags,
        *overrides(tiny_model_dir, prepared_dir, tmp_path / "run", "data.shuffle=false"),
    ]
    assert main(args) == 0
    (first,) = read_metrics(tmp_path / "run", "train")
    assert first["loss"] == pytest.approx(expected(tiny_model_dir, prepared_dir), abs=1e-5)


def test_custom_loss_class_by_import_path_trains(tiny_model_dir, prepared_dir, tmp_path, monkeypatch):
    module = tmp_path / "margin_loss_under_test.py"  # a name no other test imports
    module.write_text(
        "import torch\n"
        "class MarginLoss(torch.nn.Module):\n"
        "    def __init__(self, scale: float = 1.0):\n"
        "        super().__init__()\n"
        "        self.scale = scale\n"
        "    def forward(self, policy, reference):\n"
        "        margin = (policy.chosen_logps - reference.chosen_logps) - (policy.rejected_logps - reference.rejected_logps)\n"
        "        return torch.nn.functional.softplus(-self.scale * margin), margin.detach(), -margin.detach()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = overrides(
        tiny_model_dir, prepared_dir, tmp_path / "run", "loss.scale=0.5", "training.max_steps=3", "optimizer.lr=1e-2"
    )
    assert main(["train", "--config", "tiny_lora", "--loss", "margin_loss_under_test:MarginLoss", *args]) == 0
    losses = train_losses(tmp_path / "run")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # softplus(0)
    assert len(losses) == 3


def test_merge_writes_a_full_model_equal_to_base_plus_adapter(tiny_model_dir, prepared_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = run_recipe(
        overrides(
            tiny_model_dir,
            prepared_dir,
            tmp_path / "run",
            "training.max_steps=2",
            "optimizer.lr=1e-2",
            "output.merge=true",
        )
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").eval()
    inputs = torch.tensor([[3, 40, 41, 42, 5, 4, 50, 51]])
    recipe.policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=inputs).logits, recipe.policy(input_ids=inputs).logits, atol=1e-4, rtol=0
        )
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "config.json").is_file()


def test_plot_writes_png_curves(tiny_model_dir, prepared_dir, tmp_path):
    run = tmp_path / "run"
    assert (
        main(["train", "--config", "tiny_lora", *overrides(tiny_model_dir, prepared_dir, run, "training.max_steps=2")])
        == 0
    )
    assert main(["plot", str(run)]) == 0
    for name in ("loss", "accuracy", "margins", "rewards"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(run)]) == 0  # its own folder: replotted in place
    # A folder of the user's with a loss.png dpokit did not write is refused, not overwritten.
    mine = tmp_path / "figures"
    mine.mkdir()
    (mine / "loss.png").write_bytes(b"my figure")
    assert main(["plot", str(run), "--out", str(mine)]) == 1
    assert (mine / "loss.png").read_bytes() == b"my figure" and sorted(p.name for p in mine.iterdir()) == ["loss.png"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_loss_is_one_clear_line(tiny_model_dir, prepared_dir, tmp_path, capsys):
    assert main(["train", "--loss", "dpx", *overrides(tiny_model_dir, prepared_dir, tmp_path / "run")]) == 1
    assert (
        "unknown loss 'dpx'; choose one of aot, aot_pair, apo_down, apo_zero, apo_zero_unpaired, bco, bco_unpaired, discopop, dpo, "
        in error_line(capsys)
    )


def test_gamma_on_dpo_is_one_clear_line(tiny_model_dir, prepared_dir, tmp_path, capsys):
    assert (
        main(["train", "--loss", "dpo", "--gamma", "0.5", *overrides(tiny_model_dir, prepared_dir, tmp_path / "run")])
        == 1
    )
    assert "loss 'dpo' has no parameter gamma; its parameters: loss.label_smoothing, " in error_line(capsys)


def test_qlora_without_bitsandbytes_is_one_clear_line(tiny_model_dir, prepared_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    assert main(["train", "--method", "qlora", *overrides(tiny_model_dir, prepared_dir, tmp_path / "run")]) == 1
    assert "model.method=qlora needs bitsandbytes" in error_line(capsys)


def test_debug_flag_shows_the_traceback(tiny_model_dir, prepared_dir, tmp_path, capsys):
    assert main(["--debug", "train", "--loss", "dpx", *overrides(tiny_model_dir, prepared_dir, tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "unknown loss 'dpx'" in err and "Traceback" in err


def test_a_model_folder_without_a_tokenizer_is_refused_before_loading_the_model(
    tiny_model_dir, prepared_dir, tmp_path, capsys
):
    bare = tmp_path / "bare_model"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    assert main(["train", *overrides(bare, prepared_dir, tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "bare_model has no tokenizer" in err and "model.tokenizer=" in err
    assert (
        main(
            [
                "train",
                *overrides(
                    bare, prepared_dir, tmp_path / "run2", f"model.tokenizer={tiny_model_dir}", "training.max_steps=1"
                ),
            ]
        )
        == 0
    )


def test_existing_run_directory_is_refused_without_resume_or_overwrite(tiny_model_dir, prepared_dir, tmp_path, capsys):
    args = ["train", *overrides(tiny_model_dir, prepared_dir, tmp_path / "run"), "training.max_steps=1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 1
    assert "already has a run; pass --resume" in error_line(capsys)
    assert main(args + ["--overwrite"]) == 0
    assert len(read_metrics(tmp_path / "run", "train")) == 1


def test_default_layout_is_packed_and_prefix_shared():
    data = load_config("tiny_lora").data
    assert data.packing and data.prefix_sharing


def test_8bit_adamw_trains(tiny_model_dir, prepared_dir, tmp_path):
    args = overrides(
        tiny_model_dir,
        prepared_dir,
        tmp_path / "run",
        "optimizer.name=adamw8bit",
        "training.max_steps=3",
        "data.shuffle=false",
        "data.batch_size=32",
        "optimizer.lr=1e-2",
        "scheduler.name=constant",
    )
    assert main(["train", *args]) == 0
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < losses[0]


def test_activation_offloading_on_cpu_says_it_changes_nothing_and_changes_nothing(
    tiny_model_dir, prepared_dir, tmp_path, capsys
):
    common = ["--config", "tiny_lora", "--max-steps", "2"]
    plain, offloaded = tmp_path / "plain", tmp_path / "offloaded"
    assert main(["train", *common, *overrides(tiny_model_dir, prepared_dir, plain)]) == 0
    capsys.readouterr()
    assert (
        main(
            ["train", *common, *overrides(tiny_model_dir, prepared_dir, offloaded, "model.activation_offloading=true")]
        )
        == 0
    )
    assert "on CPU they are already there, so it changes nothing" in capsys.readouterr().err
    assert train_losses(offloaded) == train_losses(plain)


@pytest.mark.slow
def test_compile_compiles_each_decoder_layer_and_changes_no_loss(tiny_model_dir, prepared_dir, tmp_path, monkeypatch):
    import dpokit.recipe_api

    compiled = []
    real = dpokit.recipe_api.compile_layers  # the recipe takes its names from the recipe API when it is loaded
    monkeypatch.setattr(
        dpokit.recipe_api,
        "compile_layers",
        lambda model, backend: compiled.append(real(model, backend)) or compiled[-1],
    )
    common = ["--config", "tiny_lora", "--max-steps", "3", "--lr", "1e-2"]
    plain, with_compile = tmp_path / "plain", tmp_path / "compiled"
    assert main(["train", *common, *overrides(tiny_model_dir, prepared_dir, plain)]) == 0
    # The eager backend traces with dynamo like inductor but generates no kernels: the wiring, in seconds.
    assert (
        main(
            [
                "train",
                *common,
                *overrides(
                    tiny_model_dir,
                    prepared_dir,
                    with_compile,
                    "training.compile=true",
                    "training.compile_backend=eager",
                ),
            ]
        )
        == 0
    )
    assert compiled == [2]  # both layers of the tiny model
    assert train_losses(with_compile) == pytest.approx(train_losses(plain), abs=1e-6)


def test_optimizer_in_backward_trains_and_resumes_as_the_plain_optimizer(tiny_model_dir, prepared_dir, tmp_path):
    common = [
        "--config",
        "tiny_lora",
        "--method",
        "full",
        "--lr",
        "1e-3",
        "--batch-size",
        "2",
        "training.max_grad_norm=null",
        "training.save_every=2",
        "training.keep_last=3",
    ]
    plain, in_backward, resumed = tmp_path / "plain", tmp_path / "in_backward", tmp_path / "resumed"
    assert main(["train", *common, "--max-steps", "4", *overrides(tiny_model_dir, prepared_dir, plain)]) == 0
    in_bwd = [*common, "--max-steps", "4", "training.optimizer_in_backward=true"]
    assert main(["train", *in_bwd, *overrides(tiny_model_dir, prepared_dir, in_backward)]) == 0
    assert train_losses(in_backward) == pytest.approx(train_losses(plain), abs=1e-6)
    assert len(train_losses(in_backward)) == 4
    # Killed after step 2: the per-parameter optimizer states and schedules come back from the checkpoint.
    shutil.copytree(in_backward, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    assert main(["train", *in_bwd, "--resume", *overrides(tiny_model_dir, prepared_dir, resumed)]) == 0
    assert train_losses(resumed) == pytest.approx(train_losses(in_backward), abs=1e-7)


def test_optimizer_in_backward_refuses_clipping_and_accumulation_in_one_line(capsys):
    assert (
        main(
            [
                "config",
                "show",
                "tiny_lora",
                "training.optimizer_in_backward=true",
                "training.gradient_accumulation_steps=2",
            ]
        )
        == 1
    )
    err = error_line(capsys)
    assert (
        "training.optimizer_in_backward=true needs training.gradient_accumulation_steps=1, training.max_grad_norm=null"
        in err
    )


def test_adamw_uses_the_fused_kernel_for_plain_cpu_parameters():
    from dpokit.config import OptimizerConfig
    from dpokit.optim import build_optimizer

    optimizer = build_optimizer(torch.nn.Linear(4, 4), OptimizerConfig())
    assert optimizer.defaults["fused"] is True


def test_eval_samples_are_written_at_every_eval_and_shown_before_and_after(
    tiny_model_dir, prepared_dir, tmp_path, capsys
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpokit.metrics import read_samples

    run, prompts = tmp_path / "run", tmp_path / "prompts.txt"
    prompts.write_text("what is 7 plus 1?\n\n")  # one prompt; blank lines are not prompts
    args = [
        "train",
        "--config",
        "tiny_lora",
        "--max-steps",
        "4",
        *overrides(tiny_model_dir, prepared_dir, run),
        "training.eval_every=2",
        "training.eval_at_start=true",
        "eval.samples=2",
        "eval.max_new_tokens=5",
        f"eval.prompts_file={prompts}",
    ]
    assert main(args) == 0
    samples = read_samples(run)
    assert [s["step"] for s in samples] == [0, 0, 0, 2, 2, 2, 4, 4, 4]
    assert all(s["prompt"] and isinstance(s["completion"], str) for s in samples)
    assert samples[0]["prompt"] == samples[3]["prompt"]  # the same eval prompts at every eval
    # the file's prompt goes through the data's chat template, and at step 0 (LoRA starts as a no-op) the reply is
    # the model's own greedy continuation
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert samples[2]["prompt"] == "<|user|>what is 7 plus 1?<|end|><|assistant|>"
    ids = tokenizer(samples[2]["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    greedy = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert samples[2]["completion"] == tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True).strip()
    summary = capsys.readouterr().err
    assert "eval samples" in summary and "step 0" in summary and "step 4" in summary  # before and after, side by side


@pytest.mark.parametrize("method", ["full", "lora"])
def test_lean_loading_builds_the_same_policy_as_loading_the_whole_model(method, tiny_model_dir):
    """Built on the meta device and filled from the safetensors file (here without sharding: every row), the policy
    equals `load_policy`'s weight for weight, LoRA adapters included (drawn from the RNG in the same order)."""
    from dpokit.model import lean_loading_blocker, load_policy, load_policy_sharded

    cfg = load_config("tiny_lora", [f"model.path={tiny_model_dir}", f"model.method={method}"])
    assert lean_loading_blocker(cfg.model, None, compile=False) is None
    torch.manual_seed(7)
    whole = load_policy(cfg.model, cfg.lora, torch.device("cpu"))
    torch.manual_seed(7)
    lean = load_policy_sharded(cfg.model, cfg.lora, torch.device("cpu"), shard=lambda model: None)
    expected, got = whole.state_dict(), lean.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert [n for n, p in lean.named_parameters() if p.requires_grad] == [
        n for n, p in whole.named_parameters() if p.requires_grad
    ]
    base = {name: dict(m.named_buffers()) for name, m in (("whole", whole), ("lean", lean))}
    assert base["whole"].keys() == base["lean"].keys()  # the rotary tables, computed, not left empty
    assert all(torch.equal(base["whole"][k], base["lean"][k]) for k in base["whole"])


def test_lean_loading_says_why_it_cannot_apply(tiny_model_dir, tmp_path):
    from dpokit.model import lean_loading_blocker

    qlora = load_config("tiny_lora", [f"model.path={tiny_model_dir}", "model.method=qlora"]).model
    assert lean_loading_blocker(qlora, None, compile=False).startswith("model.method=qlora")
    lora = load_config("tiny_lora", [f"model.path={tiny_model_dir}"]).model
    assert lean_loading_blocker(lora, "some/adapter", compile=False).startswith("reference.adapter")
    assert lean_loading_blocker(lora, None, compile=True).startswith("training.compile")
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    elsewhere = load_config("tiny_lora", [f"model.path={tmp_path}"]).model
    assert lean_loading_blocker(elsewhere, None, compile=False) == f"{tmp_path} has no local safetensors files"


def test_batches_prepared_by_loader_processes_train_exactly_as_in_process(tiny_model_dir, prepared_dir, tmp_path):
    runs = {}
    for workers in (0, 1):
        run = tmp_path / f"workers_{workers}"
        args = [
            "train",
            "--config",
            "tiny_lora",
            "--max-steps",
            "3",
            *overrides(tiny_model_dir, prepared_dir, run),
            f"data.num_workers={workers}",
            "training.gradient_accumulation_steps=2",
        ]
        assert main(args) == 0
        runs[workers] = [(r["step"], r["loss"], r["rewards/margins"]) for r in read_metrics(run, "train")]
    assert runs[1] == runs[0]


def test_checkpoints_written_in_the_background_resume_exactly(tiny_model_dir, prepared_dir, tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "run"
    common = ("--max-steps", "6", "training.save_every=2", "training.keep_last=3", "--lr", "1e-3")
    assert main(["train", "--config", "tiny_lora", *overrides(tiny_model_dir, prepared_dir, straight), *common]) == 0
    assert (
        main(
            [
                "train",
                "--config",
                "tiny_lora",
                *overrides(tiny_model_dir, prepared_dir, run),
                *common,
                "training.async_save=true",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004", "step_0000006"]
    shutil.rmtree(run / "checkpoints" / "step_0000006")
    assert (
        main(
            [
                "train",
                "--config",
                "tiny_lora",
                *overrides(tiny_model_dir, prepared_dir, run),
                *common,
                "training.async_save=true",
                "--resume",
            ]
        )
        == 0
    )  # from the step-4 checkpoint written in the background
    assert [r["loss"] for r in read_metrics(run, "train")] == pytest.approx(
        [r["loss"] for r in read_metrics(straight, "train")], abs=1e-6
    )


def test_a_checkpoint_whose_metadata_would_run_code_is_refused_on_resume_and_export(
    tiny_model_dir, prepared_dir, tmp_path, capsys
):
    import os
    import pickle

    run, marker = tmp_path / "run", tmp_path / "it_ran"

    class Payload:  # what a shared checkpoint's `.metadata` could hold
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    args = ["train", *overrides(tiny_model_dir, prepared_dir, run), "--method", "full", "training.save_every=1"]
    assert main([*args, "training.max_steps=2"]) == 0
    checkpoints = sorted((run / "checkpoints").glob("step_*"))
    for checkpoint in checkpoints:
        (checkpoint / "shards" / ".metadata").write_bytes(pickle.dumps(Payload()))
    capsys.readouterr()
    assert main([*args, "training.max_steps=3", "output.allow_config_change=true", "--resume"]) == 1
    assert main(["export", str(checkpoints[0]), "--out", str(tmp_path / "exported")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert not marker.exists()
    assert len(errors) == 2 and all("refers to posix.system" in line for line in errors)


@pytest.mark.parametrize(
    "damage", ["flipped byte in training_state.pt", "missing shard file", "missing .metadata", "missing digests.json"]
)
def test_resume_skips_a_damaged_newest_checkpoint_with_one_note(damage, tiny_model_dir, prepared_dir, tmp_path, capsys):
    common = [
        "training.max_steps=8",
        "data.batch_size=2",
        "optimizer.lr=1e-3",
        "training.save_every=4",
        "training.keep_last=5",
    ]
    straight = tmp_path / "straight"
    assert main(["train", "--config", "tiny_lora", *overrides(tiny_model_dir, prepared_dir, straight, *common)]) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    newest = resumed / "checkpoints" / "step_0000008"
    if damage.startswith("flipped"):
        state = bytearray((newest / "training_state.pt").read_bytes())
        state[len(state) // 2] ^= 0xFF
        (newest / "training_state.pt").write_bytes(bytes(state))
    elif damage == "missing shard file":
        next((newest / "shards").glob("*.distcp")).unlink()
    elif damage == "missing digests.json":
        (newest / "digests.json").unlink()
    else:
        (newest / "shards" / ".metadata").unlink()
    capsys.readouterr()
    assert (
        main(["train", "--config", "tiny_lora", *overrides(tiny_model_dir, prepared_dir, resumed, *common), "--resume"])
        == 0
    )
    notes = [line for line in capsys.readouterr().err.splitlines() if "is damaged" in line]
    assert len(notes) == 1 and "step_0000008" in notes[0] and "resuming from step_0000004" in notes[0]
    assert train_losses(resumed) == pytest.approx(train_losses(straight), abs=1e-6)


def test_a_folder_that_only_looks_like_a_run_is_refused(tiny_model_dir, prepared_dir, tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text("my: own settings\n")
    for flags in ([], ["--overwrite"]):
        assert main(["train", *overrides(tiny_model_dir, prepared_dir, folder), "training.max_steps=1", *flags]) == 1
        assert "is a non-empty directory that is not a dpokit run" in capsys.readouterr().err
    assert (folder / "config.yaml").read_text() == "my: own settings\n"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints", "config.yaml"]


SYNCS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "cpu")


def test_a_training_step_reads_from_the_device_once_outside_log_steps(
    tiny_model_dir, prepared_dir, tmp_path, monkeypatch
):
    """Every read of a tensor's value on the host (an `.item()`, `float()`, `.cpu()` ...) waits for the GPU: a step
    that is not logged may read once, the non-finite guard's loss and gradient norm together."""
    import collections
    import traceback

    counts = collections.Counter()
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            counts[(_name, caller.filename.rsplit("/", 1)[-1], caller.lineno)] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def syncs(steps: int) -> collections.Counter:
        counts.clear()
        args = ["--max-steps", str(steps), "training.log_every=1000", "training.eval_every=0", "--lr", "1e-3"]
        assert (
            main(
                [
                    "train",
                    "--config",
                    "tiny_lora",
                    *overrides(tiny_model_dir, prepared_dir, tmp_path / f"run{steps}", *args),
                ]
            )
            == 0
        )
        return collections.Counter(counts)

    few, many = syncs(3), syncs(7)
    per_step = {key: (many[key] - few[key]) / 4 for key in many if many[key] != few[key]}
    # The data pipeline builds each batch from host tensors before it goes to the device: not a device read.
    on_device = {key: n for key, n in per_step.items() if key[1] not in HOST_PIPELINE}
    assert list(on_device.values()) == [1.0], per_step  # once a step, in the recipe's optimizer step
    assert [key[:2] for key in on_device] == [("tolist", "dpo.py")], per_step


HOST_PIPELINE = {"collate.py", "sampler.py", "loader.py", "prepared.py"}
