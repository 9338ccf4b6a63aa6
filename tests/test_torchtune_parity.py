"""The shipped torchtune-equivalent configs equal `dpokit import torchtune` of torchtune's own YAMLs, key by key.

tests/data/torchtune/ holds torchtune's DPO configs as published (each names its source commit). Each shipped
config is compared with the import of its torchtune YAML after both are loaded as `dpokit train` loads them
(defaults filled in), so a key either file leaves out counts with its default. Only places (paths, the run
directory, where metrics go) and the differences listed in `ON_PURPOSE` may differ; each of those is commented
``torchtune:`` on its line in the shipped config.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from dpokit.config import flatten, load_config, resolve_config_path
from dpokit.losses import build_loss, loss_parameters
from dpokit.torchtune_config import convert, import_torchtune

TORCHTUNE = Path(__file__).resolve().parent / "data" / "torchtune"
QLORA_BUILDER = "torchtune.models.llama3_1.qlora_llama3_1_8b"
# shipped config -> (torchtune YAML, model builder replacing its own (None: as published), pairs per optimizer step)
SHIPPED = {
    "llama3_1_8b_lora_single_device": ("llama3_1_8B_lora_dpo_single_device.yaml", None, 4 * 8 * 1),
    "llama3_1_8b_lora_2gpu": ("llama3_1_8B_lora_dpo.yaml", None, 4 * 8 * 2),
    "llama3_1_8b_full_4gpu": ("llama3_1_8B_full_dpo.yaml", None, 4 * 8 * 4),
    # torchtune has no QLoRA DPO config; README: its single-device LoRA recipe with the qlora builder
    "llama3_1_8b_qlora_single_device": ("llama3_1_8B_lora_dpo_single_device.yaml", QLORA_BUILDER, 4 * 8 * 1),
}
# where a run reads and writes: the import names torchtune's folders, the shipped configs dpokit's
PLACES = {"model.path", "data.path", "reference.cache", "output.dir", "logging.report_to"}
ON_PURPOSE = {  # differs from torchtune's recipe without changing what is trained
    "training.save_every": "torchtune saves at the end only; dpokit also saves every 250 steps, to resume",
    "training.eval_every": "torchtune's DPO recipes do not evaluate; dpokit evaluates an eval split if given one",
    "training.keep_last": "torchtune keeps every checkpoint; the full-DPO config keeps the last (each is 8B + AdamW)",
}


def torchtune_yaml(name: str, builder: str | None, tmp_path: Path) -> Path:
    """The copy of torchtune's YAML `name`, with its model builder replaced by `builder` if one is given."""
    path = TORCHTUNE / name
    if builder is None:
        return path
    text = path.read_text()
    assert text.count("torchtune.models.llama3_1.lora_llama3_1_8b") == 1
    changed = tmp_path / name
    changed.write_text(text.replace("torchtune.models.llama3_1.lora_llama3_1_8b", builder))
    return changed


def settings(cfg) -> dict:
    """Every key of a loaded config, dotted, with the loss as the parameters of the built loss object."""
    values = dict(flatten(dataclasses.asdict(cfg)))
    loss = build_loss(cfg.loss)
    values = {key: value for key, value in values.items() if not key.startswith("loss.")}
    values["loss.class"] = type(loss).__name__
    values.update({f"loss.{name}": getattr(loss, name) for name in loss_parameters(type(loss))})
    return values


@pytest.mark.parametrize("shipped", sorted(SHIPPED))
def test_shipped_config_equals_the_import_of_torchtunes_yaml_key_by_key(shipped, tmp_path):
    name, builder, _ = SHIPPED[shipped]
    out = tmp_path / "imported.yaml"
    import_torchtune(torchtune_yaml(name, builder, tmp_path), out)
    imported, ours = settings(load_config(str(out))), settings(load_config(shipped))
    assert imported.keys() == ours.keys()
    differing = {key for key in imported if imported[key] != ours[key]}
    assert differing - PLACES - set(ON_PURPOSE) == set(), {k: (imported[k], ours[k]) for k in differing}
    text = resolve_config_path(shipped).read_text()
    for key in differing & set(ON_PURPOSE):  # each deliberate difference says torchtune's value where it is set
        line = next(line for line in text.splitlines() if re.match(rf"\s+{key.split('.')[1]}:", line))
        assert "torchtune:" in line or "torchtune's" in line, line


@pytest.mark.parametrize("shipped", sorted(SHIPPED))
def test_shipped_config_gives_torchtunes_pairs_per_optimizer_step(shipped, tmp_path):
    name, builder, pairs = SHIPPED[shipped]
    source = yaml.safe_load((TORCHTUNE / name).read_text())
    devices = int(re.search(r"--nproc_per_node (\d+)", (TORCHTUNE / name).read_text())[1]) if "dpo.yaml" in name else 1
    assert source["batch_size"] * source["gradient_accumulation_steps"] * devices == pairs  # torchtune's own numbers
    text = resolve_config_path(shipped).read_text()
    gpus = int(re.search(r"dpokit train --config \S+ .*?(?:--gpus (\d+))?$", text, re.M)[1] or 1)
    cfg = load_config(shipped, world_size=gpus)
    assert cfg.data.batch_size * cfg.training.gradient_accumulation_steps * gpus == pairs
    assert cfg.training.max_grad_norm is None  # torchtune's DPO configs set no clip_grad_norm
    assert cfg.model.dtype == "bfloat16" and (cfg.model.precision == "pure" or cfg.model.method != "full")


def test_full_dpo_with_a_different_ref_checkpointer_trains_from_one_and_caches_the_other(tmp_path):
    tree = yaml.safe_load((TORCHTUNE / "llama3_1_8B_full_dpo.yaml").read_text())
    tree["checkpointer"]["checkpoint_dir"] = "/ckpt/sft-step-500/"
    config, unmapped, commands, notes = convert(tree, "8B_full_dpo.yaml", "dpokit.yaml")
    assert config["model"]["path"] == "/ckpt/sft-step-500/"
    assert config["reference"] == {"source": "cache", "cache": "ref.h5", "model": "/tmp/Meta-Llama-3.1-8B-Instruct/"}
    assert commands[-2:] == [
        "dpokit ref-logps prepared --model /tmp/Meta-Llama-3.1-8B-Instruct/ --out ref.h5 --dtype bf16",
        "dpokit train --config dpokit.yaml",
    ]
    assert "--model /ckpt/sft-step-500/ " in commands[-3]  # prepare tokenizes with the policy's tokenizer
    # the tokenizer file sits in the reference's folder, not the policy's: dpokit uses the policy's own
    assert [line.split("=")[0] for line in unmapped] == ["tokenizer.path"]
    assert any(note.startswith("ref_checkpointer loads /tmp/Meta-Llama-3.1-8B-Instruct/") for note in notes)
    out = tmp_path / "dpokit.yaml"
    source = tmp_path / "8B_full_dpo.yaml"
    source.write_text(yaml.safe_dump(tree))
    import_torchtune(source, out)
    cfg = load_config(str(out))  # dpokit's own checks accept it: reference.model with a cache
    assert (cfg.model.path, cfg.reference.model, cfg.reference.source) == (
        "/ckpt/sft-step-500/",
        "/tmp/Meta-Llama-3.1-8B-Instruct/",
        "cache",
    )
