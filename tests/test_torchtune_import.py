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

# torchtune's recipes/configs/llama3_1/*_dpo*.yaml as published (copies in tests/data/torchtune, with their commit)
TORCHTUNE = Path(__file__).resolve().parent / "data" / "torchtune"
# tune run lora_dpo_single_device --config llama3_1/8B_lora_dpo_single_device
LORA_DPO_SINGLE_DEVICE = (TORCHTUNE / "llama3_1_8B_lora_dpo_single_device.yaml").read_text()
# tune run --nnodes 1 --nproc_per_node 2 lora_dpo_distributed --config llama3_1/8B_lora_dpo
LORA_DPO_DISTRIBUTED = (TORCHTUNE / "llama3_1_8B_lora_dpo.yaml").read_text()
# tune run --nnodes 1 --nproc_per_node 4 full_dpo_distributed --config llama3_1/8B_full_dpo
FULL_DPO_DISTRIBUTED = (TORCHTUNE / "llama3_1_8B_full_dpo.yaml").read_text()
UNMAPPED_IN_ALL_THREE = []  # seed: null is a note, log_level: INFO is dpokit's default too
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
    assert unmapped == [  # as each part is mapped, then what is left in the file's order (log_level: null is unset)
        "tokenizer.prompt_template=torchtune.data.QuestionAnswerTemplate: dpokit formats pairs with the tokenizer's chat "
        "template (dpokit prepare --chat-template replaces it)",
        "optimizer._component_=bitsandbytes.optim.PagedAdamW8bit: dpokit's adamw8bit does not page its state to CPU memory",
        "profiler.enabled=True: dpokit has no built-in profiler; run it under torch.profiler or nsys",
        "metric_logger.entity=me: dpokit's W&B runs go to your default entity (or WANDB_ENTITY)",
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
        "dataset.train_on_input=True: dpokit's log-probs cover the replies only, as torchtune's default train_on_input=False",
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
            ).replace("model_type: LLAMA3", "model_type: LLAMA3_VISION"),
            r"bad\.yaml: model\._component_=torchtune\.models\.llama3_2_vision\.lora_llama3_2_vision_11b is not a torchtune "
            r"model builder dpokit knows.*this one's is torchtune\.training\.FullModelHFCheckpointer with model_type "
            r"LLAMA3_VISION",
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
    assert "\nevery torchtune key was mapped\n" in printed and "  - seed=null: torchtune draws" in printed
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


# ---------------------------------------------------------------------------------------------
# issue 28: loss_type, unknown builders, where checkpoints go, prompt formats, unset keys


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("sigmoid", {"name": "dpo", "beta": 0.2, "label_smoothing": 0.0}),  # plain DPO
        ("hinge", {"name": "rso", "gamma": 0.2}),  # relu(1 - beta h): RSO's hinge with gamma = beta
        ("ipo", {"name": "ipo", "tau": 0.2}),  # (h - 1/(2 beta))^2
    ],
)
def test_old_dpo_loss_types_map_to_their_dpokit_losses(loss_type, expected):
    loss = {"_component_": "torchtune.modules.rlhf.loss.DPOLoss", "beta": 0.2, "loss_type": loss_type}
    conversion = convert(torchtune_tree(LORA_DPO_SINGLE_DEVICE, loss=loss))
    assert conversion.config["loss"] == expected
    assert not any(line.startswith("loss.") for line in conversion.unmapped)


def test_an_old_dpo_loss_type_dpokit_lacks_is_an_error_naming_it():
    loss = {"_component_": "torchtune.modules.rlhf.loss.DPOLoss", "loss_type": "kto_pair"}
    with pytest.raises(DpokitError, match=r"8B\.yaml: loss\.loss_type=kto_pair has no dpokit loss; .*sigmoid -> dpo"):
        convert(torchtune_tree(LORA_DPO_SINGLE_DEVICE, loss=loss), "8B.yaml")


@pytest.mark.parametrize(
    "builder, arguments, method, targets",
    [
        ("my_models.lora_llama3_1_8b_long", True, "lora", ["q_proj", "v_proj", "o_proj", "gate_proj"]),
        ("my_models.custom_llama", True, "lora", ["q_proj", "v_proj", "o_proj", "gate_proj"]),
        ("my_models.custom_llama", False, "full", None),
    ],
)
def test_a_builder_dpokit_does_not_know_is_accepted_with_a_hugging_face_checkpointer_model_type(
    builder, arguments, method, targets
):
    model = {"_component_": builder}
    if arguments:
        model.update({"lora_attn_modules": ["q_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True})
    tree = yaml.safe_load(LORA_DPO_SINGLE_DEVICE)
    tree["model"] = model
    conversion = convert(tree)
    assert conversion.config["model"]["method"] == method
    assert (conversion.config.get("lora") or {}).get("target_modules", [None])[:4] == (targets or [None])
    assert any(note.startswith(f"model._component_={builder}: not a builder") for note in conversion.notes)
    tree["checkpointer"]["_component_"] = "torchtune.training.FullModelMetaCheckpointer"
    with pytest.raises(DpokitError, match=r"with model_type LLAMA3"):
        convert(tree)


def test_output_dir_is_where_torchtunes_checkpointer_writes():
    tree = yaml.safe_load(FULL_DPO_DISTRIBUTED)
    tree["checkpointer"]["output_dir"] = "/ckpt/full_dpo"
    config, unmapped, _, notes = convert(tree)
    assert config["output"]["dir"] == "/ckpt/full_dpo"
    assert any(note.startswith("output.dir=/ckpt/full_dpo: torchtune writes checkpoints") for note in notes)
    # metrics under the old output_dir are not in the run directory: reported
    assert unmapped == [
        "metric_logger.log_dir=/tmp/torchtune/llama3_1_8B/full_dpo/logs: dpokit writes metrics into "
        "output.dir (metrics.jsonl)"
    ]
    same = convert(yaml.safe_load(FULL_DPO_DISTRIBUTED))  # ${output_dir}: one directory, no note
    assert same.config["output"]["dir"] == "/tmp/torchtune/llama3_1_8B/full_dpo"
    assert not any(note.startswith("output.dir=") for note in same.notes)


def test_prompt_format_notes_say_what_dpokit_templates_differently_and_how_to_match():
    llama2 = convert(yaml.safe_load((TORCHTUNE / "llama2_7B_lora_dpo_single_device.yaml").read_text()))
    assert any("llama2_tokenizer wraps each prompt in Llama2ChatTemplate" in note for note in llama2.notes)
    assert llama2.unmapped == []
    none = torchtune_tree(
        (TORCHTUNE / "llama2_7B_lora_dpo_single_device.yaml").read_text(), tokenizer={"prompt_template": None}
    )
    assert not any(note.startswith("prompt format") for note in convert(none).notes)  # no template: nothing to say
    llama3 = convert(yaml.safe_load(LORA_DPO_SINGLE_DEVICE))
    assert any("'Cutting Knowledge Date'" in note and "--chat-template" in note for note in llama3.notes)


def test_disabled_unset_and_default_keys_are_not_listed_as_unmapped():
    tree = torchtune_tree(
        LORA_DPO_SINGLE_DEVICE,
        cudnn_deterministic_mode=None,
        tensor_parallel_dim=1,
        data_parallel_shard_dim=-1,
        custom_sharded_layers=[],
        log_level="info",
        some_new_flag=False,
        another_key="kept",
    )
    assert convert(tree).unmapped == ["another_key=kept: no dpokit equivalent"]


def test_llama3_template_in_docs_writes_torchtunes_llama3_format():
    import re

    import jinja2

    page = (Path(__file__).resolve().parents[1] / "docs" / "torchtune.md").read_text()
    template = re.search(r"```jinja\n(.*?)```", page, re.S)[1]
    messages = [{"role": "user", "content": " What is 2+2? "}, {"role": "assistant", "content": "4."}]
    text = jinja2.Template(template).render(
        messages=messages, bos_token="<|begin_of_text|>", add_generation_prompt=False
    )
    # torchtune's Llama3Tokenizer: bos, then per message <|start_header_id|>ROLE<|end_header_id|>\n\n, the stripped
    # text and <|eot_id|> (torchtune/models/llama3/_tokenizer.py); no system block
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
    )
    prompt = jinja2.Template(template).render(
        messages=messages[:1], bos_token="<|begin_of_text|>", add_generation_prompt=True
    )
    assert prompt == text[: text.index("4.")]
