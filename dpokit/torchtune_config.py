"""`dpokit import torchtune`: a torchtune DPO recipe config, converted into a dpokit training config.

torchtune builds each part of a run from a ``_component_`` and its arguments; a dpokit config is plain
settings (`dpokit.config`), and its data and reference log-probs are made once, before training, by
``dpokit prepare`` and ``dpokit ref-logps``. `convert` maps every torchtune key it knows onto a dpokit
key or onto those commands (docs/torchtune.md has the table). Keys are taken out of the tree as they are
mapped, and whatever is left at the end is reported, one line per key with the reason, so nothing is
dropped silently. `import_torchtune` reads the YAML, converts it, validates the result with dpokit's
own config checks and writes it through `dpokit.artifacts`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shlex
import typing
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from dpokit.artifacts import check_replaceable, imported_header, replace_atomically
from dpokit.config import TrainConfig, build_dataclass, check_config, flatten, read_config_tree, torchtune_keys
from dpokit.errors import DpokitError
from dpokit.trackers import TRACKERS

PREPARED, REF_CACHE = "prepared", "ref.h5"  # where the suggested commands put the data and the cache

# torchtune.models.<family>: the text decoders dpokit loads from their Hugging Face checkpoints.
FAMILIES = (
    "llama2",
    "code_llama2",
    "llama3",
    "llama3_1",
    "llama3_2",
    "llama3_3",
    "mistral",
    "gemma",
    "gemma2",
    "qwen2",
    "qwen2_5",
    "qwen3",
    "phi3",
    "phi4",
)
# torchtune's checkpointer model_type (torchtune.training.ModelType) -> the family whose module names it has: a
# builder dpokit does not know (your own, say) is accepted when a Hugging Face checkpointer names one of these
MODEL_TYPES = {
    "LLAMA2": "llama2",
    "LLAMA3": "llama3",
    "LLAMA3_2": "llama3_2",
    "MISTRAL": "mistral",
    "GEMMA": "gemma",
    "GEMMA2": "gemma2",
    "QWEN2": "qwen2",
    "QWEN3": "qwen3",
    "PHI3_MINI": "phi3",
    "PHI4": "phi4",
}
HF_CHECKPOINTER = "FullModelHFCheckpointer"
# torchtune's LoRA targets by their Hugging Face module names; Phi-3/4 fuse q, k, v (and gate, up) in one.
ATTENTION = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
MLP = ["gate_proj", "up_proj", "down_proj"]
FUSED_FAMILIES = ("phi3", "phi4")
FUSED_ATTENTION = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "output_proj": "o_proj"}
FUSED_MLP = ["gate_up_proj", "down_proj"]

# torchtune loss class -> dpokit loss, and torchtune's defaults of its arguments (named as dpokit's parameters)
LOSSES = {
    "DPOLoss": ("dpo", {"beta": 0.1, "label_smoothing": 0.0}),
    "RSOLoss": ("rso", {"gamma": 0.1}),
    "IPOLoss": ("ipo", {"tau": 0.1}),
    "SimPOLoss": ("simpo", {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.0}),
}
REFERENCE_FREE = ("simpo",)
# torchtune before 0.3 chose the loss with DPOLoss(loss_type=...); each type's beta is the named dpokit parameter
LOSS_TYPES = {"sigmoid": ("dpo", "beta"), "hinge": ("rso", "gamma"), "ipo": ("ipo", "tau")}
OPTIMIZERS = {
    "torch.optim.AdamW": "adamw",
    "bitsandbytes.optim.AdamW8bit": "adamw8bit",
    "bitsandbytes.optim.PagedAdamW8bit": "adamw8bit",
}
ADAMW_LR, ADAMW_WEIGHT_DECAY = 1e-3, 0.01  # torch's (and bitsandbytes') defaults, which dpokit's own do not share
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}
REF_LOGPS_DTYPES = {"bfloat16": "bf16", "float32": "fp32"}  # `dpokit ref-logps --dtype`

# torchtune preference datasets -> the arguments their builders fix (the rest are `preference_dataset`'s)
DATASETS = {
    "preference_dataset": {},
    "stack_exchange_paired_dataset": {
        "source": "lvwerra/stack-exchange-paired",
        "data_dir": "data/rl",
        "column_map": {"prompt": "question", "chosen": "response_j", "rejected": "response_k"},
    },
    "hh_rlhf_helpful_dataset": {"source": "RLHFlow/HH-RLHF-Helpful-standard"},
}
FILE_SOURCES = ("json", "csv", "parquet")  # load_dataset's file builders whose files `dpokit prepare` reads
# torchtune metric logger -> dpokit's logging.report_to (metrics.jsonl is always written: DiskLogger's log),
# its arguments -> logging keys, and the defaults torchtune gives them
LOGGERS = {
    "DiskLogger": ([], {}, {}),
    "StdoutLogger": ([], {}, {}),
    "TensorBoardLogger": (["tensorboard"], {}, {}),
    "WandBLogger": (["wandb"], {"project": "project", "name": "run_name"}, {"project": "torchtune"}),
    "MLFlowLogger": (
        ["mlflow"],
        {"experiment_name": "project", "run_name": "run_name", "tracking_uri": "mlflow_tracking_uri"},
        {},
    ),
}


WHY = {  # why a torchtune key has no dpokit equivalent, where there is more to say than that
    "log_level": "not a config key in dpokit: pass --log-level to the command (or set DPOKIT_LOG_LEVEL)",
    "seed": "torchtune draws a new seed each run; dpokit always seeds (training.seed, default 42)",
    "resume_from_checkpoint": "dpokit cannot resume a torchtune run; it resumes its own runs (dpokit train --resume)",
    "custom_sharded_layers": "dpokit shards every decoder layer with FSDP2 and has no per-layer list",
    "tensor_parallel_dim": "dpokit shards with FSDP2 only, without tensor parallelism",
    "tokenizer.prompt_template": "dpokit formats pairs with the tokenizer's chat template "
    "(dpokit prepare --chat-template replaces it)",
    "dataset.train_on_input": "dpokit's log-probs cover the replies only, as torchtune's default train_on_input=False",
    "dataset.filter_fn": "a Python filter; filter the rows before dpokit prepare",
    "dataset.packed": "dpokit packs each batch itself (data.packing, on by default)",
    "profiler.enabled": "dpokit has no built-in profiler; run it under torch.profiler or nsys",
    "metric_logger.entity": "dpokit's W&B runs go to your default entity (or WANDB_ENTITY)",
    "metric_logger.group": "no logging key in dpokit (WANDB_RUN_GROUP sets it)",
}
# torchtune keys whose value here is what torchtune does without them, and what dpokit does too: nothing to carry
TORCHTUNE_DEFAULTS = {
    "log_level": "INFO",  # dpokit's default log level is info
    "tensor_parallel_dim": 1,  # no tensor parallelism
    "data_parallel_replicate_dim": 1,  # no replication: FSDP shards over every process, as dpokit's FSDP2
    "data_parallel_shard_dim": -1,
}
ABSENT = object()
EXPONENT = re.compile(r"[-+]?\d+[eE][-+]?\d+")  # 5e-4: YAML 1.1 (PyYAML) reads it as a string
INTERPOLATION = re.compile(r"\$\{([^}]*)\}")
DOTTED_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class Conversion(NamedTuple):
    """A converted torchtune config.

    Fields: ``config``, the dpokit config tree (the sections of recipes/configs/*.yaml); ``unmapped``,
    one line per torchtune key dpokit has no equivalent for (the key, its value and why); ``commands``,
    what to run to prepare the data, cache the reference and train; ``notes``, settings that map with a
    difference worth knowing.
    """

    config: dict[str, Any]
    unmapped: list[str]
    commands: list[str]
    notes: list[str]


# ---------------------------------------------------------------------------------------------
# reading


def read_torchtune_config(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML mapping at `path`, or a `DpokitError` naming the file."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise DpokitError(f"cannot read torchtune config {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise DpokitError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(tree, dict):
        raise DpokitError(f"{path}: a torchtune config is a mapping of keys, got {type(tree).__name__}")
    return tree


def _numbers(value: Any) -> Any:
    """`value` with exponent numbers such as ``5e-4`` as floats: PyYAML reads them as strings, OmegaConf as numbers."""
    if isinstance(value, dict):
        return {key: _numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_numbers(item) for item in value]
    return float(value) if isinstance(value, str) and EXPONENT.fullmatch(value) else value


def resolve_interpolations(tree: dict[str, Any], source: str) -> dict[str, Any]:
    """`tree` with OmegaConf's ``${key}`` and ``${section.key}`` references replaced by those values, as
    torchtune's loader would; a resolver (``${oc.env:HOME}``), a missing key or a cycle raises `DpokitError`."""

    def lookup(reference: str, where: str, depth: int) -> Any:
        if not DOTTED_KEY.fullmatch(reference):
            raise DpokitError(
                f"{source}: {where} uses ${{{reference}}}, which only OmegaConf can resolve; write its value instead"
            )
        node: Any = tree
        for part in reference.split("."):
            if not isinstance(node, dict) or part not in node:
                raise DpokitError(
                    f"{source}: {where} refers to ${{{reference}}}, but the config has no key {reference}"
                )
            node = node[part]
        if depth > 20:
            raise DpokitError(f"{source}: {where}: ${{{reference}}} refers back to itself")
        return resolve(node, reference, depth + 1)

    def resolve(value: Any, where: str, depth: int = 0) -> Any:
        if isinstance(value, dict):
            return {key: resolve(item, f"{where}.{key}".lstrip("."), depth) for key, item in value.items()}
        if isinstance(value, list):
            return [resolve(item, f"{where}[{index}]", depth) for index, item in enumerate(value)]
        if not isinstance(value, str):
            return value
        whole = INTERPOLATION.fullmatch(value)
        if whole:  # the value itself, with its type
            return lookup(whole[1], where, depth)
        return INTERPOLATION.sub(lambda match: str(lookup(match[1], where, depth)), value)

    return resolve(tree, "")


# ---------------------------------------------------------------------------------------------
# converting


def convert(tree: dict[str, Any], source: str = "torchtune config", config_path: str = "dpokit.yaml") -> Conversion:
    """Convert a torchtune DPO recipe config (a parsed YAML mapping) into a dpokit config tree.

    Args:
        source: how errors name the config (its file).
        config_path: where the dpokit config will be, for the suggested ``dpokit train --config``.

    Raises `DpokitError` for a config that is not a DPO one or names a model builder dpokit does not know.
    """
    return _Converter(resolve_interpolations(_numbers(tree), source), source).run(config_path)


class _Keys:
    """The torchtune tree, taken from key by key; what is still here at the end was not mapped."""

    def __init__(self, tree: dict[str, Any]):
        self.tree = copy.deepcopy(tree)

    def take(self, dotted: str, default: Any = None) -> Any:
        *parents, last = dotted.split(".")
        node: Any = self.tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            return default
        return node.pop(last)

    def left(self) -> list[tuple[str, Any]]:
        """(dotted key, value) of every leaf not taken (a section whose keys were all taken is empty)."""
        return list(flatten(self.tree))


class _Converter:
    """One conversion: each method maps one part of the torchtune config (see docs/torchtune.md)."""

    def __init__(self, tree: dict[str, Any], source: str):
        self.tree = tree  # as read, for keys that refer to others
        self.keys = _Keys(tree)
        self.source = source
        self.max_seq_len = None  # tokenizer.max_seq_len, for `dpokit prepare --max-length`
        self.checkpoint_output = None  # checkpointer.output_dir: where torchtune writes the checkpoints
        self.config: dict[str, dict[str, Any]] = {field.name: {} for field in dataclasses.fields(TrainConfig)}
        self.unmapped: list[str] = []
        self.notes: list[str] = []
        self.commands: list[str] = []

    def run(self, config_path: str) -> Conversion:
        loss = self.loss()  # first: a config without a preference loss is not a DPO config
        self.model()
        self.checkpointers()
        self.tokenizer()
        self.training()
        self.optimizer()
        self.scheduler()
        self.logging()
        train = f"dpokit train --config {shlex.quote(config_path)}"
        self.commands = [*self.data_commands(), *self.reference_commands(loss), train]
        self.notes.append(
            "on N GPUs (torchtune's lora_dpo_distributed or full_dpo_distributed, tune run --nproc_per_node N): add "
            "--gpus N to dpokit ref-logps and dpokit train; batch_size stays per GPU, as in torchtune"
            + (" (qlora and qdora run on one GPU only)" if self.config["model"]["method"] in ("qlora", "qdora") else "")
        )
        for key, value in self.keys.left():
            if not unset(key, value):
                self.report(key, value)
        config = {section: in_schema_order(section, values) for section, values in self.config.items() if values}
        return Conversion(config, self.unmapped, self.commands, self.notes)

    def set(self, dotted: str, value: Any) -> None:
        section, key = dotted.split(".")
        self.config[section][key] = value

    def report(self, key: str, value: Any, reason: str | None = None) -> None:
        """Add ``key=value: reason`` to the unmapped lines (the reason: `WHY`'s, or that there is no equivalent)."""
        shown = value if not isinstance(value, (dict, list)) else yaml.safe_dump(value, default_flow_style=True).strip()
        self.unmapped.append(f"{key}={shown}: {reason or WHY.get(key, 'no dpokit equivalent')}")

    # ---- the loss and the model

    def loss(self) -> str:
        component = self.keys.take("loss._component_")
        name = str(component).rsplit(".", 1)[-1]
        if not (str(component).startswith("torchtune.") and name in LOSSES):
            raise DpokitError(
                f"{self.source}: not a torchtune DPO config: loss._component_ is {component}; dpokit imports DPO "
                f"recipe configs, whose loss is one of {', '.join(f'torchtune.rlhf.loss.{cls}' for cls in LOSSES)}"
            )
        loss, defaults = LOSSES[name]
        loss_type = self.keys.take("loss.loss_type", "sigmoid") if name == "DPOLoss" else "sigmoid"
        if loss_type not in LOSS_TYPES:
            raise DpokitError(
                f"{self.source}: loss.loss_type={loss_type} has no dpokit loss; torchtune's DPOLoss types map as "
                + ", ".join(f"{kind} -> {dpokit}" for kind, (dpokit, _) in LOSS_TYPES.items())
                + " (`dpokit train --loss` lists dpokit's losses)"
            )
        if loss_type != "sigmoid":  # the old DPOLoss's hinge and ipo: beta is their only parameter
            loss, parameter = LOSS_TYPES[loss_type]
            smoothing = self.keys.take("loss.label_smoothing", 0.0)
            if smoothing:
                self.report("loss.label_smoothing", smoothing, f"torchtune's loss_type={loss_type} does not use it")
            self.config["loss"] = {"name": loss, parameter: self.keys.take("loss.beta", 0.1)}
        else:
            self.config["loss"] = {
                "name": loss,
                **{arg: self.keys.take(f"loss.{arg}", default) for arg, default in defaults.items()},
            }
        if loss == "ipo":
            self.notes.append(
                "loss: torchtune's IPOLoss compares summed log-probs, dpokit's ipo log-probs averaged over the reply "
                "tokens (as TRL and the IPO paper): the same tau gives a different target margin"
            )
        return loss

    def model(self) -> None:
        component = self.keys.take("model._component_")
        if not component:
            raise DpokitError(
                f"{self.source}: model._component_ is missing; a torchtune DPO config names its model builder there "
                "(e.g. torchtune.models.llama3_1.lora_llama3_1_8b)"
            )
        parts = str(component).split(".")
        family = parts[2] if len(parts) == 4 and parts[:2] == ["torchtune", "models"] else None
        method, base = next(
            ((m, parts[-1][len(m) + 1 :]) for m in ("qlora", "lora") if parts[-1].startswith(f"{m}_")),
            ("full", parts[-1]),
        )
        if family not in FAMILIES or not base.startswith(family):
            family = self.family_from_checkpointer(component)
            if method == "full" and "lora_attn_modules" in (self.tree.get("model") or {}):
                method = "lora"  # your own LoRA builder: its arguments say so
        if method != "full":
            method = self.lora(family, qlora=method == "qlora")
        self.set("model.method", method)

    def family_from_checkpointer(self, component: str) -> str:
        """The family of a builder dpokit does not know, from a Hugging Face checkpointer's ``model_type``."""
        checkpointer = self.tree.get("checkpointer") or {}
        model_type = str(checkpointer.get("model_type"))
        hf = str(checkpointer.get("_component_")).endswith(HF_CHECKPOINTER)
        if not (hf and model_type in MODEL_TYPES):
            raise DpokitError(
                f"{self.source}: model._component_={component} is not a torchtune model builder dpokit knows; it "
                f"converts torchtune.models.FAMILY.[lora_|qlora_]BUILDER for the text families {', '.join(FAMILIES)}, "
                f"or any builder whose checkpointer is torchtune.training.{HF_CHECKPOINTER} with a text model_type "
                f"({', '.join(MODEL_TYPES)}); this one's is {checkpointer.get('_component_')} with model_type "
                f"{checkpointer.get('model_type')}"
            )
        self.notes.append(
            f"model._component_={component}: not a builder dpokit knows; checkpointer.model_type={model_type} with "
            "Hugging Face weights, so dpokit loads the checkpoint as it is (its architecture from config.json) and "
            "takes the method from the builder's name and arguments"
        )
        return MODEL_TYPES[model_type]

    def lora(self, family: str, qlora: bool) -> str:
        """The lora section from a LoRA builder's arguments; returns the method (lora, qlora, dora or qdora)."""
        fused = family in FUSED_FAMILIES
        names, mlp = (FUSED_ATTENTION, FUSED_MLP) if fused else (ATTENTION, MLP)
        attention = self.keys.take("model.lora_attn_modules") or []
        targets = []
        for module in attention:
            if module not in names:
                self.report("model.lora_attn_modules", module, f"not one of torchtune's {', '.join(names)}")
            elif names[module] not in targets:
                targets.append(names[module])
        if fused and 0 < len({"q_proj", "k_proj", "v_proj"} & set(attention)) < 3:
            self.notes.append(f"model.lora_attn_modules: {family} fuses q, k and v in qkv_proj; LoRA adapts all three")
        if self.keys.take("model.apply_lora_to_mlp", False):
            targets += mlp
        if self.keys.take("model.apply_lora_to_output", False):
            targets.append("lm_head")
        if not targets:
            raise DpokitError(f"{self.source}: model.lora_attn_modules is empty; a LoRA builder needs a module")
        self.config["lora"] = {
            "rank": self.keys.take("model.lora_rank", 8),  # the torchtune builders' defaults
            "alpha": self.keys.take("model.lora_alpha", 16),
            "dropout": self.keys.take("model.lora_dropout", 0.0),
            "target_modules": targets,
        }
        quantized = self.keys.take("model.quantize_base", False) or qlora
        dora = self.keys.take("model.use_dora", False)
        # torchtune saves the merged model beside the adapter unless told not to
        self.set("output.merge", not self.keys.take("save_adapter_weights_only", False))
        return ("q" if quantized else "") + ("dora" if dora else "lora")

    def checkpointers(self) -> None:
        """model.path from the checkpointer, output.dir from where it writes; a ref_checkpointer elsewhere is
        reference.model (the cache is built from it, and the policy starts away from it on purpose)."""
        policy = self.checkpoint_dir("checkpointer")
        if policy is not None:
            self.set("model.path", policy)
        self.checkpoint_output = self.keys.take("checkpointer.output_dir")
        reference = self.checkpoint_dir("ref_checkpointer")
        self.keys.take("ref_checkpointer.output_dir")  # torchtune never writes the reference
        if reference is not None and policy is not None and Path(reference) != Path(policy):
            self.set("reference.model", reference)
            self.notes.append(
                f"ref_checkpointer loads {reference}, not the policy's {policy}: reference.model={reference}, so "
                "dpokit ref-logps builds the cache from it (--model) and the step-0 check reports how far the policy "
                "starts from it instead of stopping"
            )

    def tokenizer(self) -> None:
        """The model's own Hugging Face tokenizer; the pairs' length goes to `dpokit prepare`."""
        model = self.config["model"].get("path")
        for key in ("tokenizer.path", "tokenizer.merges_file"):
            path = self.keys.take(key)
            if path is not None and (model is None or Path(model) not in Path(path).parents):
                self.report(
                    key,
                    path,
                    "dpokit uses the Hugging Face tokenizer saved with the model (model.path); "
                    "set model.tokenizer to a Hugging Face tokenizer directory or hub name",
                )
        component = str(self.keys.take("tokenizer._component_"))
        template = self.keys.take("tokenizer.prompt_template", ABSENT)
        note = prompt_format_note(component.rsplit(".", 1)[-1], template)
        if note:
            self.notes.append(note)
        if template not in (ABSENT, None) and not component.endswith("llama2_tokenizer"):
            self.report("tokenizer.prompt_template", template)
        self.max_seq_len = self.keys.take("tokenizer.max_seq_len")

    def checkpoint_dir(self, section: str) -> str | None:
        """The Hugging Face directory a torchtune checkpointer section loads, its other keys taken or reported."""
        component = self.keys.take(f"{section}._component_")
        directory = self.keys.take(f"{section}.checkpoint_dir")
        for key in ("checkpoint_files", "model_type"):  # dpokit loads every shard and reads the family from config.json
            self.keys.take(f"{section}.{key}")
        for key in ("recipe_checkpoint", "adapter_checkpoint"):
            value = self.keys.take(f"{section}.{key}")
            if value is not None:
                self.report(f"{section}.{key}", value, WHY["resume_from_checkpoint"])
        if directory is not None and component is not None and not str(component).endswith(HF_CHECKPOINTER):
            self.report(
                f"{section}._component_",
                component,
                "dpokit loads Hugging Face checkpoints only; pass the "
                "model's Hugging Face directory or hub name with --model (model.path is left unset)",
            )
            return None
        return None if directory is None else str(directory)

    # ---- training, optimizer, schedule, logging

    def training(self) -> None:
        for key, dotted in torchtune_keys().items():  # the keys that map value for value (the config schema)
            value = self.keys.take(key, ABSENT)
            if value is not ABSENT:
                self.set(dotted, value)
        self.output_dir()
        epochs = self.keys.take("epochs", 1)
        steps_per_epoch = self.keys.take("max_steps_per_epoch")
        if steps_per_epoch is None:
            self.set("training.epochs", epochs)
        else:
            self.set("training.max_steps", epochs * steps_per_epoch)
            self.notes.append(
                f"training.max_steps={epochs * steps_per_epoch} is epochs x max_steps_per_epoch; where an epoch of the "
                "data is shorter, torchtune ends that epoch early and dpokit goes on into the next pass"
            )
        self.set("training.max_grad_norm", self.keys.take("clip_grad_norm"))  # absent: no clipping, as torchtune
        seed = self.keys.take("seed", ABSENT)
        if seed is None:
            self.notes.append(
                "seed=null: torchtune draws a new seed each run; dpokit seeds every run with training.seed (default 42)"
            )
        elif seed is not ABSENT:
            self.set("training.seed", seed)
        if self.keys.take("resume_from_checkpoint", False):
            self.report("resume_from_checkpoint", True)
        dtype = self.keys.take("dtype")
        if dtype in DTYPES:
            self.set("model.dtype", DTYPES[dtype])
            if DTYPES[dtype] == "bfloat16" and self.config["model"]["method"] == "full":
                self.set("model.precision", "pure")
                self.notes.append(
                    "dtype=bf16: torchtune's full fine-tuning keeps weights and AdamW state in bf16, as "
                    "model.precision=pure; model.precision=mixed keeps fp32 master weights (more memory, small updates "
                    "kept)"
                )
        elif dtype is not None:
            self.report("dtype", dtype, "torchtune's DPO recipes take bf16 or fp32 (model.dtype bfloat16 or float32)")
        device = self.keys.take("device", "cuda")
        if device not in ("cuda", "cpu"):
            self.report("device", device, "dpokit runs on CUDA when there is a GPU, else on the CPU")

    def output_dir(self) -> None:
        """output.dir is where torchtune writes the checkpoints (checkpointer.output_dir): the run directory holds
        them; torchtune's top-level output_dir is only what ${output_dir} refers to."""
        top = self.config["output"].get("dir")
        if self.checkpoint_output is None or str(self.checkpoint_output) == str(top):
            return
        self.set("output.dir", str(self.checkpoint_output))
        if top is not None:
            self.notes.append(
                f"output.dir={self.checkpoint_output}: torchtune writes checkpoints to checkpointer.output_dir, not "
                f"output_dir={top}; dpokit keeps checkpoints and metrics.jsonl in that one run directory"
            )

    def optimizer(self) -> None:
        component = self.keys.take("optimizer._component_")
        name = OPTIMIZERS.get(str(component))
        if name is None:
            self.report(
                "optimizer._component_",
                component,
                "dpokit trains with AdamW (optimizer.name adamw, or "
                "adamw8bit from bitsandbytes); its lr, betas, eps and weight_decay are kept",
            )
        elif "Paged" in str(component):
            self.report("optimizer._component_", component, "dpokit's adamw8bit does not page its state to CPU memory")
        optimizer = {
            "name": name or "adamw",
            "lr": self.keys.take("optimizer.lr", ADAMW_LR),
            "weight_decay": self.keys.take("optimizer.weight_decay", ADAMW_WEIGHT_DECAY),
        }
        for key in ("betas", "eps"):
            value = self.keys.take(f"optimizer.{key}")
            if value is not None:
                optimizer[key] = value
        self.keys.take("optimizer.fused")  # dpokit uses AdamW's fused kernel wherever it serves the parameters
        self.config["optimizer"] = optimizer

    def scheduler(self) -> None:
        component = self.keys.take("lr_scheduler._component_")
        if component is None:  # torchtune without a scheduler: a constant learning rate
            self.config["scheduler"] = {"name": "constant", "warmup_steps": 0}
            return
        if not re.fullmatch(r"torchtune\.[\w.]+\.get_cosine_schedule_with_warmup", str(component)):
            self.report(
                "lr_scheduler._component_",
                component,
                "dpokit's schedules are warmup + cosine, linear or constant; cosine is used",
            )
        cycles = self.keys.take("lr_scheduler.num_cycles", 0.5)
        if cycles != 0.5:
            self.report(
                "lr_scheduler.num_cycles",
                cycles,
                "dpokit's cosine is one half-wave, from the peak to scheduler.min_lr_ratio",
            )
        warmup = self.keys.take("lr_scheduler.num_warmup_steps", 0)
        self.config["scheduler"] = {"name": "cosine", "warmup_steps": warmup}

    def logging(self) -> None:
        self.keys.take("log_peak_memory_stats")  # dpokit logs peak_memory_mb at every step
        profiler = self.keys.take("profiler")
        if isinstance(profiler, dict) and profiler.get("enabled"):  # off, it changes nothing
            self.report("profiler.enabled", True)
        component = self.keys.take("metric_logger._component_")
        if component is None:
            return
        name = str(component).rsplit(".", 1)[-1]
        if name not in LOGGERS:
            settings = self.keys.take("metric_logger") or {}
            self.report(
                "metric_logger._component_",
                component,
                f"dpokit reports to {', '.join(TRACKERS)} (logging.report_to) besides metrics.jsonl, not to "
                f"{name}" + (f"; its {', '.join(settings)} go with it" if settings else ""),
            )
            return
        report_to, arguments, defaults = LOGGERS[name]
        self.set("logging.report_to", report_to)
        for argument, key in arguments.items():
            value = self.keys.take(f"metric_logger.{argument}", defaults.get(argument))
            if value is not None:
                self.set(f"logging.{key}", value)
        log_dir = self.keys.take("metric_logger.log_dir")
        run_dir = self.config["output"].get("dir")
        if log_dir is not None and (run_dir is None or not Path(log_dir).is_relative_to(run_dir)):
            self.report("metric_logger.log_dir", log_dir, "dpokit writes metrics into output.dir (metrics.jsonl)")

    # ---- the data and the reference: commands to run before training

    def data_commands(self) -> list[str]:
        """``dpokit prepare`` (after a download where torchtune read one folder of a hub dataset) for the dataset."""
        self.set("data.path", PREPARED)
        model = self.config["model"].get("path", "MODEL")
        spec = self.tree.get("dataset")
        if isinstance(spec, list):  # torchtune concatenates a list of datasets
            self.keys.tree["dataset"] = spec[0] if spec else {}
            if len(spec) > 1:
                self.report(
                    "dataset",
                    f"[{len(spec)} datasets]",
                    "dpokit prepare reads one source (a file, a folder "
                    "of files or a hub dataset); the command below prepares the first only",
                )
        component = str(self.keys.take("dataset._component_"))
        defaults = DATASETS.get(component.rsplit(".", 1)[-1]) if component.startswith("torchtune.datasets.") else None
        if defaults is None:
            self.keys.take("dataset")
            self.report(
                "dataset._component_",
                component,
                "not a torchtune preference dataset; give your pairs to "
                "dpokit prepare as a file, a folder or a hub dataset (docs/data-formats.md)",
            )
            return [self.prepare_command("DATA", [], model)]
        source = self.keys.take("dataset.source", defaults.get("source"))
        data_dir = self.keys.take("dataset.data_dir", defaults.get("data_dir"))
        files = self.keys.take("dataset.data_files")
        split = self.keys.take("dataset.split", "train")
        options, commands = [], []
        if files is not None or data_dir is not None:
            if split != "train":
                self.report("dataset.split", split, "dpokit prepare reads every row of a file or folder")
        if files is not None:
            files = [files] if isinstance(files, str) else list(files)
            data = files[0] if len(files) == 1 else os.path.commonpath([str(Path(f).parent) for f in files])
            if len(files) > 1:
                self.report(
                    "dataset.data_files",
                    files,
                    f"dpokit prepare reads one file or every file in a folder ({data} here)",
                )
            if source not in FILE_SOURCES:
                self.report("dataset.source", source, "dpokit prepare reads .json, .jsonl, .csv and .parquet files")
        elif data_dir is not None:  # load_dataset(source, data_dir=...): one folder of the hub dataset
            local = str(source).rsplit("/", 1)[-1]
            commands.append(
                shlex.join(
                    [
                        "hf",
                        "download",
                        str(source),
                        "--repo-type",
                        "dataset",
                        "--include",
                        f"{data_dir}/*",
                        "--local-dir",
                        local,
                    ]
                )
            )
            data = f"{local}/{data_dir}"
        else:
            data = str(source)
            options += ["--split", str(split)] if split != "train" else []
            subset = self.keys.take("dataset.name")
            options += ["--subset", str(subset)] if subset is not None else []
        column_map = self.keys.take("dataset.column_map") or defaults.get("column_map")
        if column_map:
            options += ["--column-map", ",".join(f"{target}={column}" for target, column in column_map.items())]
        system_prompt = self.keys.take("dataset.new_system_prompt")
        if system_prompt is not None:
            options += ["--system-prompt", str(system_prompt)]
        if self.keys.take("dataset.train_on_input", False):
            self.report("dataset.train_on_input", True)
        return [*commands, self.prepare_command(data, options, model)]

    def prepare_command(self, data: str, options: list[str], model: str) -> str:
        if self.max_seq_len is not None:
            options = [*options, "--max-length", str(self.max_seq_len)]
        else:
            self.notes.append(
                "tokenizer.max_seq_len is unset: torchtune keeps whole pairs, dpokit prepare cuts "
                "them at --max-length (default 1024)"
            )
        return shlex.join(["dpokit", "prepare", data, "--model", model, "--out", PREPARED, *options])

    def reference_commands(self, loss: str) -> list[str]:
        """``dpokit ref-logps`` in the run's dtype (from reference.model where it is set), unless the loss needs no
        reference."""
        reference = self.config["reference"]
        if loss in REFERENCE_FREE:
            if reference.pop("model", None) is not None:
                self.notes = [note for note in self.notes if not note.startswith("ref_checkpointer loads")]
                self.report(
                    "ref_checkpointer.checkpoint_dir",
                    self.tree["ref_checkpointer"]["checkpoint_dir"],
                    f"the {loss} loss uses no reference",
                )
            return []
        self.config["reference"] = {"source": "cache", "cache": REF_CACHE, **reference}
        model = reference.get("model") or self.config["model"].get("path", "MODEL")
        dtype = REF_LOGPS_DTYPES.get(self.config["model"].get("dtype"))
        return [
            shlex.join(
                [
                    "dpokit",
                    "ref-logps",
                    PREPARED,
                    "--model",
                    model,
                    "--out",
                    REF_CACHE,
                    *(["--dtype", dtype] if dtype else []),
                ]
            )
        ]


# ---------------------------------------------------------------------------------------------
# checking and writing


def prompt_format_note(tokenizer: str, template: Any) -> str | None:
    """What dpokit prepare, templating with the model's Hugging Face chat template, writes differently from
    torchtune's tokenizer `tokenizer` (with its ``prompt_template``), and how to match it; None where nothing."""
    if tokenizer == "llama2_tokenizer" and template is not None:
        name = "Llama2ChatTemplate" if template is ABSENT else template
        return (
            f"prompt format: torchtune's llama2_tokenizer wraps each prompt in {name} ([INST] ... [/INST]) unless "
            "tokenizer.prompt_template is null; dpokit prepare uses the chat template saved with the model (a base "
            "Llama 2 has none): to template as torchtune did, pass dpokit prepare --chat-template with the [INST] "
            "template of docs/torchtune.md"
        )
    if tokenizer == "llama3_tokenizer":
        return (
            "prompt format: torchtune's llama3_tokenizer writes each message as <|start_header_id|>ROLE"
            "<|end_header_id|>, the text, <|eot_id|>; Llama 3.1's and 3.2's Hugging Face chat templates add a system "
            "block with 'Cutting Knowledge Date' and 'Today Date' lines to every prompt: to template as torchtune did, "
            "pass dpokit prepare --chat-template with the Llama 3 template of docs/torchtune.md"
        )
    return None


def unset(key: str, value: Any) -> bool:
    """Whether a torchtune key left over is disabled (false), unset (null, empty) or at torchtune's default, so
    leaving it out changes nothing and it is not listed as unmapped."""
    if value is None or value is False or value == [] or value == {}:
        return True
    default = TORCHTUNE_DEFAULTS.get(key, ABSENT)
    return default is not ABSENT and str(value).lower() == str(default).lower()


def in_schema_order(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """A section's keys in the order `dpokit.config` declares them (the loss section's as they are)."""
    schema = typing.get_type_hints(TrainConfig)[section]
    if not dataclasses.is_dataclass(schema):
        return values
    names = [field.name for field in dataclasses.fields(schema)]
    return {key: values[key] for key in sorted(values, key=names.index)}


def validate(config: dict[str, Any], source: str) -> TrainConfig:
    """`config` as `dpokit.config.load_config` would check it (one process), or a `DpokitError` naming `source`."""
    try:
        tree = read_config_tree(config_yaml(config), "the converted config")  # as `dpokit train --config` reads it
        cfg = build_dataclass(TrainConfig, tree, prefix="", source="the converted config")
        check_config(cfg, world_size=1)
    except DpokitError as exc:
        raise DpokitError(f"{source}: {exc}") from exc
    return cfg


class _FlowLists(yaml.SafeDumper):
    """Lists on one line (``target_modules: [q_proj, v_proj]``), as in the shipped configs."""


_FlowLists.add_representer(
    list, lambda dumper, items: dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=True)
)


def config_yaml(config: dict[str, Any]) -> str:
    return yaml.dump(config, Dumper=_FlowLists, sort_keys=False)


def config_text(conversion: Conversion, source: Path) -> str:
    """The file `import_torchtune` writes: the import header, the commands and unmapped keys as comments, the YAML."""
    lines = [
        imported_header(source).rstrip("\n"),
        "# dpokit's counterpart of that torchtune DPO config (docs/torchtune.md). Run:",
        "#",
    ]
    lines += [f"#   {command}" for command in conversion.commands]
    if conversion.unmapped:
        lines += ["#", "# torchtune settings without a dpokit equivalent:"]
        lines += [f"#   - {line}" for line in conversion.unmapped]
    return "\n".join(lines) + "\n" + config_yaml(conversion.config)


def import_torchtune(config: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Conversion:
    """Convert the torchtune DPO config file `config` and write the dpokit config to `out`.

    `out` may replace only a file an earlier import wrote, and only with `overwrite`. The converted config
    is validated first: nothing is written for one dpokit would refuse.
    """
    config, out = Path(config), Path(out)
    check_replaceable(out, "imported", overwrite, inputs=(config,))
    conversion = convert(read_torchtune_config(config), str(config), str(out))
    validate(conversion.config, str(config))
    text = config_text(conversion, config)
    replace_atomically(out, "imported", lambda tmp: tmp.write_text(text))
    return conversion


def summary(conversion: Conversion, out: str | os.PathLike) -> str:
    """What `dpokit import torchtune` prints: the file written, the commands to run, the notes and unmapped keys."""
    lines = [f"wrote {out}", "", "next:"] + [f"  {command}" for command in conversion.commands]
    if conversion.notes:
        lines += ["", "notes:"] + [f"  - {note}" for note in conversion.notes]
    lines += ["", "not mapped (no dpokit equivalent):" if conversion.unmapped else "every torchtune key was mapped"]
    lines += [f"  - {line}" for line in conversion.unmapped]
    return "\n".join(lines)
