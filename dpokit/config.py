"""Typed training config: YAML files, CLI flags and dotted ``key=value`` overrides, validated.

A config is a tree of dataclasses. ``load_config`` merges, in order: the defaults below, a YAML
file (a shipped name such as ``tiny_lora`` or a path), then overrides such as ``optimizer.lr=1e-5``.
Unknown keys and values of the wrong type raise ``DpokitError`` naming the key and the choices.
The ``loss`` section is open: ``loss.name`` picks the loss and every other key is passed to its
constructor (checked against that constructor's parameters in ``dpokit.losses``).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
import os
from typing import Any, Iterator, Literal, Optional

import yaml

from dpokit.errors import DpokitError
from dpokit.types import ABOVE_0, AT_LEAST_0, AT_LEAST_1, UNIT, Range


QUANTIZED_METHODS = ("qlora", "qdora")  # a bitsandbytes 4-bit base under the adapter
ADAPTER_METHODS = ("lora", "dora", "qlora", "qdora")


@dataclass
class ModelConfig:
    path: str = ""  # local directory or hub name of the policy (and of the reference, unless a cache is used)
    tokenizer: Optional[str] = None  # defaults to `path`
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # compute dtype; auto: bf16 on CUDA, fp32 on CPU
    # Full fine-tuning in a 16-bit dtype: "mixed" keeps fp32 master weights (16-bit compute), "pure"
    # stores and updates the weights in the 16-bit dtype (half the weight memory; small updates round away).
    precision: Literal["mixed", "pure"] = "mixed"
    method: Literal["full", "lora", "dora", "qlora", "qdora"] = "lora"
    activation_checkpointing: bool = False
    activation_offloading: bool = False  # CUDA: keep the activations saved for backward in (pinned) CPU memory
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention"] = "auto"  # auto: SDPA where the family supports it
    lean_loading: bool = True  # several processes: build on meta, shard, each rank reads only its shards' weights
    disable_dropout: bool = True  # the policy trains without the config's dropout (as TRL); LoRA dropout stays


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class DataConfig:
    path: str = ""  # a `dpokit prepare` output directory
    batch_size: int = 4  # pairs per device per micro-step
    shuffle: bool = True
    group_by_length: bool = False  # seeded length-grouped batches (less padding)
    # Layouts (bench/RESULTS.md): both on is the fastest and gives the padded layout's log-probs.
    packing: bool = True  # pack sequences into rows without padding (block-diagonal attention)
    prefix_sharing: bool = True  # compute each pair's prompt once: [prompt, chosen, rejected]
    pack_length: Optional[int] = None  # tokens per packed row; default: the batch's longest sequence
    num_workers: Optional[int] = None  # processes preparing the next steps' batches; null: 2 on CUDA, 0 on CPU
    logps_chunk_size: Optional[int] = None  # positions per chunk of the vocabulary projection; null: a byte budget


@dataclass
class ReferenceConfig:
    source: Literal["cache", "live"] = "cache"
    cache: Optional[str] = None  # ref.h5 written by `dpokit ref-logps`
    # A PEFT adapter (e.g. SFT) on model.path: the reference is base + adapter, and the policy starts
    # there too (LoRA methods continue training this adapter; full fine-tuning starts from the merge).
    adapter: Optional[str] = None


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 5e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    name: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class TrainingConfig:
    max_steps: Optional[int] = None  # optimizer steps; None: run `epochs` epochs
    epochs: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: Optional[float] = 1.0
    seed: int = 42
    eval_every: int = 0  # optimizer steps; 0: evaluate only at the end (if there is an eval split)
    eval_at_start: bool = False  # also evaluate before the first update (logged as step 0)
    eval_batches: Optional[int] = None  # cap on eval batches; None: the whole split
    save_every: int = 0  # optimizer steps; 0: save only at the end
    async_save: bool = False  # periodic checkpoints are written in the background while training goes on
    save_every_minutes: float = 0.0  # also save when this much time passed since the last save; 0: off
    skip_nonfinite: bool = False  # a non-finite loss or gradient norm skips the batch (counted) instead of stopping
    compile: bool = False  # torch.compile each decoder layer and the loss (compiles during the first steps)
    optimizer_in_backward: bool = False  # step each parameter in backward and free its gradient (no clipping/accumulation)
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"  # eager/aot_eager: to debug a compile
    keep_last: int = 2
    log_every: int = 1


@dataclass
class DistributedConfig:
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    mixed_precision: bool = True  # FSDP gathers parameters in the compute dtype and reduces gradients in fp32
    cpu_threads: Optional[int] = None  # torch threads per process on CPU; null: all cores, shared among --gpus N workers


@dataclass
class EvalConfig:
    samples: int = 0  # eval prompts the policy answers at every eval (samples.jsonl, the trackers, the summary)
    prompts_file: Optional[str] = None  # more prompts it answers at every eval: .txt lines, or rows with a 'prompt'
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy


@dataclass
class LoggingConfig:
    # where metrics go besides metrics.jsonl: any of tensorboard, wandb, mlflow, trackio (optional extras)
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = field(default_factory=lambda: ["tensorboard"])
    project: str = "dpokit"  # W&B and trackio project, MLflow experiment
    run_name: Optional[str] = None  # default: the run directory's name
    mlflow_tracking_uri: Optional[str] = None  # default: MLFLOW_TRACKING_URI, else MLflow's own default


@dataclass
class OutputConfig:
    dir: str = "runs/dpo"
    merge: bool = False  # also write a merged full model at the end (LoRA family)
    resume: bool = False
    overwrite: bool = False
    allow_config_change: bool = False  # --resume may change data, loss, batch or optimizer settings


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "dpo"})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ---------------------------------------------------------------------------------------------
# Shipped configs


def shipped_configs_dir() -> Path:
    """The folder of configs that ship with dpokit (`recipes/configs` in the source tree)."""
    return Path(str(resources.files("dpokit.recipes.configs")))


def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in shipped_configs_dir().glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A shipped config name (``tiny_lora``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise DpokitError(f"config file {path} does not exist")
        return path
    shipped = shipped_configs_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise DpokitError(
        f"unknown config {name_or_path!r}: not a file and not a shipped config; "
        f"shipped configs: {', '.join(shipped_config_names())}"
    )


# ---------------------------------------------------------------------------------------------
# Loading and validation


def load_config(
    config: Optional[str] = None, overrides: tuple[str, ...] | list[str] = (), world_size: Optional[int] = None
) -> TrainConfig:
    """Defaults, then the YAML `config` (name or path), then `key=value` overrides; validated.

    Args:
        world_size: processes the run will have, for the checks that depend on it (default: torchrun's
            ``WORLD_SIZE``, else 1).
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if config:
        path = resolve_config_path(config)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DpokitError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise DpokitError(f"{path}: a config must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(tree, key, value)
    cfg = build_dataclass(TrainConfig, tree, prefix="", source=source)
    check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size)
    return cfg


def check_config(cfg: TrainConfig, world_size: int) -> None:
    """The checks that look at more than one key, done once when a config is loaded: the loss section
    builds (its name and parameters), and nothing multi-process training does not support is asked for."""
    from dpokit.losses import build_loss

    build_loss(cfg.loss)
    if cfg.training.optimizer_in_backward:
        clashes = [
            (cfg.training.gradient_accumulation_steps != 1, "training.gradient_accumulation_steps=1"),
            (cfg.training.max_grad_norm is not None, "training.max_grad_norm=null (clipping needs every gradient first)"),
            (cfg.training.skip_nonfinite, "training.skip_nonfinite=false (the update is applied in backward, before the check)"),
            (world_size > 1, "one process"),
        ]
        needed = [fix for clash, fix in clashes if clash]
        if needed:
            raise DpokitError(f"training.optimizer_in_backward=true needs {', '.join(needed)}; or set it false")


def parse_override(text: str) -> tuple[str, Any]:
    """``optimizer.lr=1e-5`` -> ("optimizer.lr", 1e-5); the value is parsed as YAML."""
    if "=" not in text:
        raise DpokitError(f"override {text!r} is not key=value (for example optimizer.lr=1e-5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise DpokitError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads 1e-5 as a string
    return key, value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return any(c.isdigit() for c in text)


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for key ``a.b``, creating sections as needed."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise DpokitError(f"override {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def build_dataclass(cls: type, data: Any, prefix: str, source: str) -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise DpokitError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise DpokitError(
                f"{source}: unknown key {prefix}{key}{hint}; valid keys: {', '.join(prefix + n for n in names)}"
            )
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", source)
        check_range(f"{prefix}{key}", kwargs[key], source)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Ranges of numeric settings


# Every numeric setting's allowed values. An Optional key also accepts null (its meaning is in the
# dataclass comment); a list checks each item. Loss parameters are checked by the losses themselves.
RANGES: dict[str, Range] = {
    "lora.rank": AT_LEAST_1,
    "lora.alpha": ABOVE_0,
    "lora.dropout": UNIT,
    "data.batch_size": AT_LEAST_1,
    "data.num_workers": AT_LEAST_0,
    "data.pack_length": AT_LEAST_1,
    "data.logps_chunk_size": AT_LEAST_1,
    "distributed.cpu_threads": AT_LEAST_1,
    "eval.samples": AT_LEAST_0,
    "eval.max_new_tokens": AT_LEAST_1,
    "eval.temperature": AT_LEAST_0,
    "optimizer.lr": ABOVE_0,
    "optimizer.weight_decay": AT_LEAST_0,
    "optimizer.betas": UNIT,
    "optimizer.eps": ABOVE_0,
    "scheduler.warmup_steps": AT_LEAST_0,
    "scheduler.min_lr_ratio": Range(0, 1, high_inclusive=True),
    "training.max_steps": AT_LEAST_1,
    "training.epochs": AT_LEAST_1,
    "training.gradient_accumulation_steps": AT_LEAST_1,
    "training.max_grad_norm": ABOVE_0,
    "training.eval_every": AT_LEAST_0,
    "training.eval_batches": AT_LEAST_1,
    "training.save_every": AT_LEAST_0,
    "training.save_every_minutes": AT_LEAST_0,
    "training.keep_last": AT_LEAST_1,
    "training.log_every": AT_LEAST_1,
}
NULL_MEANS = {
    "data.pack_length": "null for the batch's longest sequence",
    "training.max_steps": "null to run training.epochs epochs",
    "training.max_grad_norm": "null for no clipping",
    "training.eval_batches": "null for the whole split",
    "data.logps_chunk_size": "null for as many positions as fit the device's byte budget (dpokit.logps.CHUNK_BYTES)",
    "distributed.cpu_threads": "null for the machine's cores, shared among the processes",
}
LIST_LENGTHS = {"optimizer.betas": 2}


def check_range(key: str, value: Any, source: str) -> None:
    """Refuse a numeric setting outside `RANGES[key]`, naming the key, the value and what is allowed."""
    allowed = RANGES.get(key)
    if allowed is None or value is None:
        return
    if isinstance(value, list):
        if key in LIST_LENGTHS and len(value) != LIST_LENGTHS[key]:
            raise DpokitError(f"{source}: {key} must have {LIST_LENGTHS[key]} values, got {value!r}")
        for index, item in enumerate(value):
            check_range_value(f"{key}[{index}]", item, allowed, source, key)
        return
    check_range_value(key, value, allowed, source, key)


def check_range_value(name: str, value: Any, allowed: Range, source: str, key: str) -> None:
    if value in allowed:  # NaN is in no range
        return
    alternative = f" (or {NULL_MEANS[key]})" if key in NULL_MEANS else ""
    raise DpokitError(f"{source}: {name}={value!r} is out of range; it must be {allowed}{alternative}")


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key + ".", source)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, source)
    if origin is Literal:
        if value not in args:
            raise DpokitError(f"{source}: {key}={value!r} is not valid; choose one of: {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise DpokitError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise DpokitError(f"{source}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise DpokitError(f"{source}: {key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise DpokitError(f"{source}: {key} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DpokitError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise DpokitError(f"{source}: {key} must be a string, got {value!r}")
        return str(value)
    return value


def flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"optimizer": {"lr": 1e-5}}`` -> ``("optimizer.lr", 1e-5)``, for every leaf."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML output and checkpoints)."""
    return dataclasses.asdict(config)


def config_to_yaml(config: Any) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def uses_bitsandbytes(cfg: TrainConfig) -> bool:
    """Whether a run needs bitsandbytes: 4-bit base weights (qlora, qdora) or the 8-bit optimizer."""
    return cfg.model.method in QUANTIZED_METHODS or cfg.optimizer.name == "adamw8bit"


def parse_recipe_args(argv: list[str], world_size: Optional[int] = None) -> TrainConfig:
    """A recipe's command line: ``[--config NAME|PATH] [key=value ...]``, loaded and checked (`load_config`)."""
    config = None
    overrides = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--config", "-c"):
            if not args:
                raise DpokitError("--config needs a value: a shipped config name or a YAML path")
            config = args.pop(0)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise DpokitError(f"unexpected argument {arg!r}; a recipe takes --config NAME|PATH and key=value overrides")
    return load_config(config, overrides, world_size)
