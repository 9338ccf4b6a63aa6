"""`dpokit import torchtune`: torchtune's three DPO config shapes, converted, checked by dpokit and trained on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from dpokit.cli import main
from dpokit.config import load_config
from dpokit.errors import DpokitError
from dpokit.metrics import read_metrics
from dpokit.torchtune_config import convert, import_torchtune

# torchtune's recipes/configs/llama3_1/*_dpo*.yaml as published (comments shortened); the other two are this
# one with the lines they differ in replaced.
# tune run lora_dpo_single_device --config llama3_1/8B_lora_dpo_single_device
LORA_DPO_SINGLE_DEVICE = """\
output_dir: /tmp/torchtune/llama3_1_8B/lora_dpo_single_device

model:
  _component_: torchtune.models.llama3_1.lora_llama3_1_8b
  lora_attn_modules: ['q_proj', 'v_proj', 'output_proj']
  apply_lora_to_mlp: True
  apply_lora_to_output: False
  lora_rank: 8  # higher increases accuracy and memory
  lora_alpha: 16  # usually alpha=2*rank
  lora_dropout: 0.0

tokenizer:
  _component_: torchtune.models.llama3.llama3_tokenizer
  path: /tmp/Meta-Llama-3.1-8B-Instruct/original/tokenizer.model
  max_seq_len: 1024 # higher increases memory

checkpointer:
  _component_: torchtune.training.FullModelHFCheckpointer
  checkpoint_dir: /tmp/Meta-Llama-3.1-8B-Instruct/
  checkpoint_files: [
    model-00001-of-00004.safetensors,
    model-00002-of-00004.safetensors,
    model-00003-of-00004.safetensors,
    model-00004-of-00004.safetensors
  ]
  recipe_checkpoint: null
  output_dir: ${output_dir}
  model_type: LLAMA3
resume_from_checkpoint: False
save_adapter_weights_only: False

dataset:
  _component_: torchtune.datasets.stack_exchange_paired_dataset
seed: null
shuffle: True
batch_size: 4

optimizer:
  _component_: torch.optim.AdamW
  fused: True
  weight_decay: 0.05
  lr: 5e-4
lr_scheduler:
  _component_: torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup
  num_warmup_steps: 100

loss:
  _component_: torchtune.rlhf.loss.DPOLoss

epochs: 1
max_steps_per_epoch: 1000
gradient_accumulation_steps: 8  # Use to increase effective batch size
compile: False  # torch.compile the model + loss, True increases speed + decreases memory

metric_logger:
  _component_: torchtune.training.metric_logging.DiskLogger
  log_dir: ${output_dir}/logs
log_every_n_steps: 1
log_peak_memory_stats: True
log_level: INFO  # DEBUG, WARN, etc.

device: cuda
dtype: bf16

enable_activation_checkpointing: True  # True reduces memory
enable_activation_offloading: False  # True reduces memory
"""


def replaced(text: str, *changes: tuple[str, str]) -> str:
    """`text` with each (old, new) replaced; every old text must be there once, so the shapes stay torchtune's."""
    for old, new in changes:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


LORA_ARGUMENTS = LORA_DPO_SINGLE_DEVICE.split("lora_llama3_1_8b\n")[1].split("\ntokenizer:")[0]  # lora_attn_modules...
# tune run --nnodes 1 --nproc_per_node 2 lora_dpo_distributed --config llama3_1/8B_lora_dpo: the single-device
# config with the loss's arguments written out
LORA_DPO_DISTRIBUTED = replaced(
    LORA_DPO_SINGLE_DEVICE,
    ("llama3_1_8B/lora_dpo_single_device\n", "llama3_1_8B/lora_dpo\n"),
    (
        "  _component_: torchtune.rlhf.loss.DPOLoss\n",
        "  _component_: torchtune.rlhf.loss.DPOLoss\n  beta: 0.1\n  label_smoothing: 0\n",
    ),
)
# tune run --nnodes 1 --nproc_per_node 4 full_dpo_distributed --config llama3_1/8B_full_dpo: a full model
# builder, a reference checkpointer, and its own lr, warmup and beta
FULL_DPO_DISTRIBUTED = replaced(
    LORA_DPO_DISTRIBUTED,
    ("llama3_1_8B/lora_dpo\n", "llama3_1_8B/full_dpo\n"),
    ("lora_llama3_1_8b\n" + LORA_ARGUMENTS, "llama3_1_8b\n"),
    (
        "save_adapter_weights_only: False\n",
        """
# The ref_checkpointer should always point to the original weights.
ref_checkpointer:
  _component_: torchtune.training.FullModelHFCheckpointer
  checkpoint_dir: /tmp/Meta-Llama-3.1-8B-Instruct/
  checkpoint_files: [model-00001-of-00004.safetensors, model-00002-of-00004.safetensors]
  recipe_checkpoint: null
  output_dir: ${output_dir}
  model_type: LLAMA3
""",
    ),
    ("lr: 5e-4", "lr: 2e-5"),
    ("num_warmup_steps: 100", "num_warmup_steps: 20"),
    ("beta: 0.1", "beta: 0.05"),
)
UNMAPPED_IN_ALL_THREE = [
    "seed=None: torchtune draws a new seed each run; dpokit always seeds (training.seed, default 42)",
    "log_level=INFO: not a config key in dpokit: pass --log-level to the command (or set DPOKIT_LOG_LEVEL)",
]
MODEL = "/tmp/Meta-Llama-3.1-8B-Instruct/"


def torchtune_tree(text: str, **changes) -> dict:
    """A torchtune config as YAML reads it, with top-level keys replaced (a section by a dict merged into it)."""
    tree = yaml.safe_load(text)
    for key, value in changes.items():
        tree[key] = {**tree[key], **value} if isinstance(value, dict) and isinstance(tree.get(key), dict) else value
    return tree


# ---------------------------------------------------------------------------------------------
# the three shapes


def test_single_device_lora_config_becomes_lora_with_the_same_hyperparameters():
    config, unmapped, commands, notes = convert(yaml.safe_load(LORA_DPO_SINGLE_DEVICE), "8B.yaml", "dpokit.yaml")
    assert config["model"] == {
        "path": MODEL,
        "dtype": "bfloat16",
        "method": "lora",
        "activation_checkpointing": True,
        "activation_offloading": False,
    }
    assert config["lora"] == {
        "rank": 8,
        "alpha": 16,
        "dropout": 0.0,
        "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
    assert config["data"] == {"path": "prepared", "batch_size": 4, "shuffle": True}
    assert config["reference"] == {"source": "cache", "cache": "ref.h5"}
    assert config["loss"] == {"name": "dpo", "beta": 0.1, "label_smoothing": 0.0}  # torchtune's DPOLoss defaults
    assert config["optimizer"] == {
        "name": "adamw",
        "lr": 5e-4,
        "weight_decay": 0.05,
    }  # "5e-4": a number, as OmegaConf reads it
    assert config["scheduler"] == {"name": "cosine", "warmup_steps": 100}
    assert config["training"] == {
        "max_steps": 1000,
        "gradient_accumulation_steps": 8,
        "max_grad_norm": None,
        "compile": False,
        "log_every": 1,
    }
    assert config["logging"] == {"report_to": []}  # DiskLogger: metrics.jsonl
    assert config["output"] == {"dir": "/tmp/torchtune/llama3_1_8B/lora_dpo_single_device", "merge": True}
    assert unmapped == UNMAPPED_IN_ALL_THREE
    assert commands == [
        "hf download lvwerra/stack-exchange-paired --repo-type dataset --include 'data/rl/*' --local-dir stack-exchange-paired",
        f"dpokit prepare stack-exchange-paired/data/rl --model {MODEL} --out prepared "
        "--column-map prompt=question,chosen=response_j,rejected=response_k --max-length 1024",
        f"dpokit ref-logps prepared --model {MODEL} --out ref.h5 --dtype bf16",
        "dpokit train --config dpokit.yaml",
    ]
    assert any("--gpus N" in note for note in notes)


def test_distributed_lora_config_converts_like_the_single_device_one():
    single = convert(yaml.safe_load(LORA_DPO_SINGLE_DEVICE))
    distributed = convert(yaml.safe_load(LORA_DPO_DISTRIBUTED))
    assert distributed.config["loss"] == {"name": "dpo", "beta": 0.1, "label_smoothing": 0}
    assert distributed.config["output"]["dir"] == "/tmp/torchtune/llama3_1_8B/lora_dpo"
    assert {k: v for k, v in distributed.config.items() if k != "output"} == {
        k: v for k, v in single.config.items() if k != "output"
    }
    assert distributed.unmapped == UNMAPPED_IN_ALL_THREE


def test_distributed_full_config_becomes_full_fine_tuning_in_pure_bf16():
    config, unmapped, commands, notes = convert(yaml.safe_load(FULL_DPO_DISTRIBUTED))
    assert config["model"] == {
        "path": MODEL,
        "dtype": "bfloat16",
        "precision": "pure",
        "method": "full",
        "activation_checkpointing": True,
        "activation_offloading": False,
    }
    assert "lora" not in config and "merge" not in config["output"]
    assert config["loss"] == {"name": "dpo", "beta": 0.05, "label_smoothing": 0}
    assert config["optimizer"] == {"name": "adamw", "lr": 2e-5, "weight_decay": 0.05}
    assert config["scheduler"] == {"name": "cosine", "warmup_steps": 20}
    assert config["training"]["max_steps"] == 1000 and config["training"]["gradient_accumulation_steps"] == 8
    assert unmapped == UNMAPPED_IN_ALL_THREE  # the ref_checkpointer is the policy's own checkpoint: nothing lost
    assert any("model.precision=pure" in note for note in notes)


@pytest.mark.parametrize(
    "builder, extra, method",
    [
        ("qlora_llama3_1_8b", {}, "qlora"),
        ("lora_llama3_1_8b", {"quantize_base": True}, "qlora"),
        ("lora_llama3_1_8b", {"use_dora": True}, "dora"),
        ("qlora_llama3_1_8b", {"use_dora": True}, "qdora"),
    ],
)
def test_builder_and_its_flags_pick_the_method(builder, extra, method):
    model = {"_component_": f"torchtune.models.llama3_1.{builder}", **extra}
    conversion = convert(torchtune_tree(LORA_DPO_SINGLE_DEVICE, model=model))
    assert conversion.config["model"]["method"] == method
    assert ("one GPU only" in conversion.notes[-1]) == method.startswith("q")


def test_other_families_map_lora_targets_to_their_hugging_face_names():
    qwen = {
        "_component_": "torchtune.models.qwen2_5.lora_qwen2_5_7b_instruct",
        "lora_attn_modules": ["q_proj", "k_proj"],
        "apply_lora_to_output": True,
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
    }
    lora = convert(torchtune_tree(LORA_DPO_SINGLE_DEVICE, model=qwen)).config["lora"]
    assert lora == {
        "rank": 16,
        "alpha": 32,
        "dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    }
    phi = {
        "_component_": "torchtune.models.phi3.lora_phi3_mini",
        "lora_attn_modules": ["q_proj", "v_proj", "output_proj"],
    }
    conversion = convert(torchtune_tree(LORA_DPO_SINGLE_DEVICE, model=phi))
    assert conversion.config["lora"]["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert any("qkv_proj" in note for note in conversion.notes)


@pytest.mark.parametrize(
    "loss, expected",
    [
        ({"_component_": "torchtune.rlhf.loss.RSOLoss", "gamma": 0.2}, {"name": "rso", "gamma": 0.2}),
        ({"_component_": "torchtune.modules.rlhf.loss.IPOLoss"}, {"name": "ipo", "tau": 0.1}),
        (
            {"_component_": "torchtune.rlhf.loss.SimPOLoss", "gamma": 1.0},
            {"name": "simpo", "beta": 2.0, "gamma": 1.0, "label_smoothing": 0.0},
        ),
    ],
)
def test_each_torchtune_loss_maps_to_dpokit_with_its_parameters(loss, expected):
    conversion = convert(torchtune_tree(LORA_DPO_SINGLE_DEVICE, loss=loss))
    assert conversion.config["loss"] == expected
    if expected["name"] == "simpo":  # reference-free: no cache to build
        assert "reference" not in conversion.config
        assert not any("ref-logps" in command for command in conversion.commands)
    if expected["name"] == "ipo":
        assert any("summed log-probs" in note for note in conversion.notes)


def test_what_has_no_equivalent_is_reported_key_by_key_and_loggers_map_to_report_to():
    tree = torchtune_tree(
        LORA_DPO_SINGLE_DEVICE,
        seed=7,
        clip_grad_norm=1.0,
        custom_sharded_layers=["tok_embeddings"],
        log_level=None,
        metric_logger={
            "_component_": "torchtune.training.metric_logging.WandBLogger",
            "project": "dpo",
            "entity": "me",
        },
        profiler={"_component_": "torchtune.training.setup_torch_profiler", "enabled": True},
        tokenizer={"prompt_template": "torchtune.data.QuestionAnswerTemplate"},
    )
    tree["optimizer"] = {"_component_": "bitsandbytes.optim.PagedAdamW8bit", "lr": 1e-5, "betas": [0.9, 0.95]}
    config, unmapped, _, _ = convert(tree)
    assert config["training"]["seed"] == 7 and config["training"]["max_grad_norm"] == 1.0
    assert config["optimizer"] == {
        "name": "adamw8bit",
        "lr": 1e-5,
        "weight_decay": 0.01,
        "betas": [0.9, 0.95],
    }  # AdamW's own default
    assert config["logging"] == {"report_to": ["wandb"], "project": "dpo"}
    assert unmapped == [  # as each part is mapped, then what is left in the file's order
        "optimizer._component_=bitsandbytes.optim.PagedAdamW8bit: dpokit's adamw8bit does not page its state to CPU memory",
        "profiler.enabled=True: dpokit has no built-in profiler; run it under torch.profiler or nsys",
        "tokenizer.prompt_template=torchtune.data.QuestionAnswerTemplate: dpokit formats pairs with the tokenizer's chat "
        "template (dpokit prepare --chat-template replaces it)",
        "metric_logger.entity=me: dpokit's W&B runs go to your default entity (or WANDB_ENTITY)",
        "log_level=None: not a config key in dpokit: pass --log-level to the command (or set DPOKIT_LOG_LEVEL)",
        "custom_sharded_layers=[tok_embeddings]: dpokit shards every decoder layer with FSDP2 and has no per-layer list",
    ]


def test_a_local_preference_dataset_becomes_a_prepare_command_for_its_file():
    dataset = {
        "_component_": "torchtune.datasets.preference_dataset",
        "source": "json",
        "data_files": "my pairs.jsonl",
        "column_map": {"chosen": "better", "rejected": "worse"},
        "new_system_prompt": "Be brief.",
        "train_on_input": True,
    }
    conversion = convert(torchtune_tree(LORA_DPO_SINGLE_DEVICE, dataset=dataset))
    assert conversion.commands[0] == (
        f"dpokit prepare 'my pairs.jsonl' --model {MODEL} --out prepared "
        "--column-map chosen=better,rejected=worse --system-prompt 'Be brief.' --max-length 1024"
    )
    assert conversion.unmapped == [
        UNMAPPED_IN_ALL_THREE[0],
        "dataset.train_on_input=True: dpokit's log-probs cover the replies only, as torchtune's default train_on_input=False",
        UNMAPPED_IN_ALL_THREE[1],
    ]


# ---------------------------------------------------------------------------------------------
# errors


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: [unclosed\n", r"bad\.yaml: not valid YAML"),
        ("- a list\n", r"bad\.yaml: a torchtune config is a mapping of keys, got list"),
        (
            LORA_DPO_SINGLE_DEVICE.replace(
                "torchtune.rlhf.loss.DPOLoss", "torchtune.modules.loss.CEWithChunkedOutputLoss"
            ),
            r"bad\.yaml: not a torchtune DPO config: loss\._component_ is torchtune\.modules\.loss\.CEWithChunkedOutputLoss",
        ),
        (
            LORA_DPO_SINGLE_DEVICE.replace(
                "torchtune.models.llama3_1.lora_llama3_1_8b",
                "torchtune.models.llama3_2_vision.lora_llama3_2_vision_11b",
            ),
            r"bad\.yaml: model\._component_=torchtune\.models\.llama3_2_vision\.lora_llama3_2_vision_11b is not a torchtune model builder",
        ),
        (
            LORA_DPO_SINGLE_DEVICE.replace("${output_dir}/logs", "${oc.env:HOME}/logs"),
            r"bad\.yaml: metric_logger\.log_dir uses \$\{oc\.env:HOME\}, which only OmegaConf can resolve",
        ),
        (
            LORA_DPO_SINGLE_DEVICE.replace("${output_dir}/logs", "${run_dir}/logs"),
            r"bad\.yaml: metric_logger\.log_dir refers to \$\{run_dir\}, but the config has no key run_dir",
        ),
    ],
)
def test_bad_input_is_one_error_naming_the_file_and_key(tmp_path, text, message):
    with pytest.raises(DpokitError, match=message):
        import_torchtune(write(tmp_path / "bad.yaml", text), tmp_path / "dpokit.yaml")
    assert not (tmp_path / "dpokit.yaml").exists()


def test_a_config_dpokit_would_refuse_is_not_written(tmp_path):
    source = write(tmp_path / "8B.yaml", LORA_DPO_SINGLE_DEVICE.replace("lora_rank: 8", "lora_rank: 0"))
    with pytest.raises(DpokitError, match=r"8B\.yaml: the converted config: lora\.rank=0 is out of range"):
        import_torchtune(source, tmp_path / "dpokit.yaml")
    assert not (tmp_path / "dpokit.yaml").exists()


# ---------------------------------------------------------------------------------------------
# the command: writing, replacing, training


def test_the_command_writes_a_config_prints_what_to_run_and_replaces_only_its_own_file(tmp_path, capsys):
    source, out = write(tmp_path / "8B_full_dpo.yaml", FULL_DPO_DISTRIBUTED), tmp_path / "dpokit.yaml"
    assert main(["import", "torchtune", str(source), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}\n")
    assert f"  dpokit train --config {out}\n" in printed
    assert "not mapped (no dpokit equivalent):\n  - seed=None" in printed
    assert out.read_text().startswith("# Imported by dpokit ")
    assert load_config(str(out)).model.method == "full"  # the file as `dpokit train --config` reads it

    with pytest.raises(DpokitError, match="already exists; pass --overwrite"):
        import_torchtune(source, out)
    import_torchtune(write(tmp_path / "lora.yaml", LORA_DPO_SINGLE_DEVICE), out, overwrite=True)
    assert load_config(str(out)).model.method == "lora"
    users = write(tmp_path / "mine.yaml", "model:\n  method: full\n")
    with pytest.raises(
        DpokitError, match="refusing to replace .*mine.yaml: it is not a config written by `dpokit import`"
    ):
        import_torchtune(source, users, overwrite=True)
    assert users.read_text() == "model:\n  method: full\n"


@pytest.mark.parametrize("shape", ["lora_single_device", "full_distributed"])
def test_a_converted_config_trains(tiny_model_dir, prepared_dir, ref_cache, tmp_path, shape):
    # The tiny model in fp32 (torchtune's dtype: fp32), as the test cache was computed: the step-0 check is exact.
    # (The distributed LoRA shape converts to the single-device one's config: tested above.)
    text = {"lora_single_device": LORA_DPO_SINGLE_DEVICE, "full_distributed": FULL_DPO_DISTRIBUTED}[shape]
    source = write(
        tmp_path / "torchtune.yaml", text.replace(MODEL, f"{tiny_model_dir}/").replace("dtype: bf16", "dtype: fp32")
    )
    out = tmp_path / "dpokit.yaml"
    import_torchtune(source, out)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(out),
                f"data.path={prepared_dir}",
                f"reference.cache={ref_cache}",
                f"output.dir={run}",
                "training.max_steps=2",
                "training.gradient_accumulation_steps=1",
                "output.merge=false",
            ]
        )
        == 0
    )
    steps = read_metrics(run, "train")
    assert [record["step"] for record in steps] == [1, 2]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    weights = "adapter_model.safetensors" if shape.startswith("lora") else "model.safetensors"
    assert (run / "checkpoints" / "step_0000002" / weights).is_file()


def test_docs_torchtune_md_shows_what_the_command_prints_and_writes():
    import re

    from dpokit.torchtune_config import config_yaml, summary

    page = (Path(__file__).resolve().parents[1] / "docs" / "torchtune.md").read_text()
    conversion = convert(yaml.safe_load(LORA_DPO_SINGLE_DEVICE), "8B_lora_dpo_single_device.yaml", "dpokit.yaml")
    assert re.search(r"```text\n(.*?)```", page, re.S)[1] == summary(conversion, "dpokit.yaml") + "\n"
    shown = re.search(r"```yaml\n(.*?)```", page, re.S)[1]
    assert shown[shown.index("model:") :] == config_yaml(conversion.config)


def test_checkpoint_cadence_keys_map_to_their_dpokit_settings():
    tree = torchtune_tree(LORA_DPO_SINGLE_DEVICE, save_every_n_steps=50, enable_async_checkpointing=True)
    config, unmapped, _, _ = convert(tree)
    assert config["training"]["save_every"] == 50 and config["training"]["async_save"] is True
    assert not any(line.startswith(("save_every_n_steps", "enable_async_checkpointing")) for line in unmapped)
