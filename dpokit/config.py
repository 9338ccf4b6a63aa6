"""The training config, declared once: every key's type, default, allowed range, meaning on resume,
command-line flag, torchtune counterpart and documentation live on its field below.

A config is a tree of dataclasses. ``load_config`` merges, in order: the defaults below, a YAML
file (a shipped name such as ``tiny_lora`` or a path), then overrides such as ``optimizer.lr=1e-5``.
Every value is read by its declared type (`dpokit.typed_text`): ``model.path=007`` stays the string
``'007'``. Unknown keys and values of the wrong type raise ``DpokitError`` naming the key and the choices.
The ``loss`` section is open: ``loss.name`` picks the loss and every other key is passed to its
constructor, read by the type that constructor declares (`dpokit.losses.loss_parameter_types`).

Everything that needs to know about keys derives from the fields: the range checks, `dpokit train`'s
flags (`train_flags`), what ``--resume`` may change (`changes_meaning`), the torchtune importer's
one-to-one keys (`torchtune_keys`) and ``dpokit config keys``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import yaml

from dpokit.errors import DpokitError
from dpokit.ranges import ABOVE_0, AT_LEAST_0, AT_LEAST_1, UNIT, Range
from dpokit.typed_text import Text, read_value, read_yaml_tree, where

QUANTIZED_METHODS = ("qlora", "qdora")  # a bitsandbytes 4-bit base under the adapter
ADAPTER_METHODS = ("lora", "dora", "qlora", "qdora")


def setting(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    factory: Any = dataclasses.MISSING,
    range: Optional[Range] = None,
    null: str = "",
    length: Optional[int] = None,
    meaning: bool = True,
    flag: str = "",
    short: str = "",
    torchtune: str = "",
) -> Any:
    """One config key's declaration.

    Args:
        doc: what it does (``dpokit config keys``, and the flag's help).
        range: the numbers allowed (each item, for a list); null: what null means, for an Optional key.
        length: the number of items a list must have.
        meaning: whether a different value on ``--resume`` makes a different run (refused without
            ``--allow-config-change``). False only for keys that change how, not what, a run computes.
        flag: the ``dpokit train`` option that sets it (a bool key: a switch); short: its short form.
        torchtune: the torchtune recipe key that maps to it value for value (``dpokit import torchtune``).
    """
    metadata = {
        "doc": doc,
        "range": range,
        "null": null,
        "length": length,
        "meaning": meaning,
        "flag": flag,
        "short": short,
        "torchtune": torchtune,
    }
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    path: str = setting(
        "",
        "Policy model: a local directory or a hub name (also the reference, unless a cache is used).",
        flag="--model",
        short="-m",
    )
    tokenizer: Optional[str] = setting(None, "Tokenizer directory or hub name.", null="null for model.path")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "Compute dtype; auto: bfloat16 on CUDA, float32 on CPU."
    )
    precision: Literal["mixed", "pure"] = setting(
        "mixed",
        "Full fine-tuning in a 16-bit dtype: mixed keeps fp32 master weights (16-bit compute); pure stores "
        "and updates the weights in the 16-bit dtype (half the weight memory; small updates round away).",
    )
    method: Literal["full", "lora", "dora", "qlora", "qdora"] = setting(
        "lora", "What trains: full, lora, dora, qlora or qdora (q: a bitsandbytes 4-bit base).", flag="--method"
    )
    activation_checkpointing: bool = setting(
        False,
        "Recompute each decoder layer's activations in backward instead of keeping them.",
        meaning=False,
        torchtune="enable_activation_checkpointing",
    )
    activation_offloading: bool = setting(
        False,
        "CUDA: keep the activations saved for backward in pinned CPU memory.",
        meaning=False,
        torchtune="enable_activation_offloading",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention"] = setting(
        "auto", "Attention kernels; auto: SDPA where the family supports it.", meaning=False
    )
    lean_loading: bool = setting(
        True,
        "Several processes: build on the meta device, shard, and let each rank read only its shards' weights.",
        meaning=False,
    )
    disable_dropout: bool = setting(
        True,
        "Train the policy without train-mode randomness: dropout (as TRL), LayerDrop, stochastic depth, router "
        "noise and sampled routing; LoRA dropout stays.",
    )


@dataclass
class LoraConfig:
    rank: int = setting(8, "LoRA rank r.", range=AT_LEAST_1)
    alpha: float = setting(16.0, "LoRA alpha (the update is scaled by alpha / rank).", range=ABOVE_0)
    dropout: float = setting(0.0, "Dropout on the LoRA branch's input.", range=UNIT)
    target_modules: list[str] = setting(
        factory=lambda: ["all-linear"], doc="Modules that get adapters: names such as q_proj, or all-linear."
    )


@dataclass
class DataConfig:
    path: str = setting("", "A `dpokit prepare` output directory.", flag="--data")
    batch_size: int = setting(
        4,
        "Pairs per process per micro-step.",
        range=AT_LEAST_1,
        meaning=False,
        flag="--batch-size",
        torchtune="batch_size",
    )
    shuffle: bool = setting(True, "Shuffle the pairs each epoch (seeded by training.seed).", torchtune="shuffle")
    group_by_length: bool = setting(False, "Seeded length-grouped batches (less padding).")
    packing: bool = setting(
        True,
        "Pack sequences into rows without padding, attention kept within each pair (same log-probs as padded).",
        meaning=False,
    )
    prefix_sharing: bool = setting(
        True, "Compute each pair's prompt once: [prompt, chosen, rejected] (same log-probs as padded).", meaning=False
    )
    pack_length: Optional[int] = setting(
        None, "Tokens per packed row.", range=AT_LEAST_1, null="null for the batch's longest sequence", meaning=False
    )
    num_workers: Optional[int] = setting(
        None,
        "Processes preparing the next steps' batches.",
        range=AT_LEAST_0,
        null="null for 2 on CUDA, 0 on CPU",
        meaning=False,
    )
    logps_chunk_size: Optional[int] = setting(
        None,
        "Positions per chunk of the vocabulary projection.",
        range=AT_LEAST_1,
        null="null for as many positions as fit the device's byte budget (dpokit.logps.CHUNK_BYTES)",
        meaning=False,
    )


@dataclass
class ReferenceConfig:
    source: Literal["cache", "live"] = setting(
        "cache",
        "Where the reference log-probs come from: cache (ref.h5) or live (a frozen copy runs each step).",
        flag="--ref",
    )
    cache: Optional[str] = setting(
        None,
        "The reference cache, ref.h5 written by `dpokit ref-logps`.",
        null="null with reference.source=live",
        flag="--ref-cache",
    )
    adapter: Optional[str] = setting(
        None,
        "A PEFT adapter (e.g. SFT) on model.path: the reference is base + adapter, and the policy starts there "
        "(LoRA methods continue training it; full fine-tuning starts from the merge).",
        null="null for model.path alone",
    )
    model: Optional[str] = setting(
        None,
        "The reference's own checkpoint when the policy starts elsewhere (iterative DPO with a fixed reference, a "
        "policy tuned past its reference): the cache must be built from it (`dpokit ref-logps DATA --model REF`), "
        "and the step-0 check reports how far the policy starts from it instead of stopping. Cache only.",
        null="null: the reference is model.path (with reference.adapter)",
    )


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adamw8bit"] = setting("adamw", "adamw (torch) or adamw8bit (bitsandbytes).")
    lr: float = setting(5e-6, "Peak learning rate.", range=ABOVE_0, flag="--lr")
    weight_decay: float = setting(0.0, "Decoupled weight decay.", range=AT_LEAST_0)
    betas: list[float] = setting(factory=lambda: [0.9, 0.999], doc="Adam's (beta1, beta2).", range=UNIT, length=2)
    eps: float = setting(1e-8, "Adam's epsilon.", range=ABOVE_0)


@dataclass
class SchedulerConfig:
    name: Literal["cosine", "constant", "linear"] = setting("cosine", "Learning-rate schedule after the warmup.")
    warmup_steps: int = setting(0, "Optimizer steps of linear warmup from 0.", range=AT_LEAST_0)
    min_lr_ratio: float = setting(
        0.0, "The schedule's final learning rate as a fraction of the peak.", range=Range(0, 1, high_inclusive=True)
    )


@dataclass
class TrainingConfig:
    max_steps: Optional[int] = setting(
        None, "Optimizer steps to run.", range=AT_LEAST_1, null="null to run training.epochs epochs", flag="--max-steps"
    )
    epochs: int = setting(
        1, "Passes over the data (when training.max_steps is null).", range=AT_LEAST_1, flag="--epochs"
    )
    gradient_accumulation_steps: int = setting(
        1, "Micro-steps per optimizer step.", range=AT_LEAST_1, meaning=False, torchtune="gradient_accumulation_steps"
    )
    max_grad_norm: Optional[float] = setting(
        1.0, "Clip the gradient's global norm to this.", range=ABOVE_0, null="null for no clipping"
    )
    seed: int = setting(42, "Seed of the data order, the adapters' initialisation and dropout.")
    eval_every: int = setting(
        0,
        "Evaluate every this many optimizer steps; 0: only at the end (if there is an eval split).",
        range=AT_LEAST_0,
        meaning=False,
    )
    eval_at_start: bool = setting(False, "Also evaluate before the first update (logged as step 0).", meaning=False)
    eval_batches: Optional[int] = setting(
        None, "Cap on eval batches.", range=AT_LEAST_1, null="null for the whole split", meaning=False
    )
    save_every: int = setting(
        0,
        "Save a checkpoint every this many optimizer steps; 0: only at the end.",
        range=AT_LEAST_0,
        meaning=False,
        torchtune="save_every_n_steps",
    )
    async_save: bool = setting(
        False,
        "Write periodic checkpoints in the background while training goes on.",
        meaning=False,
        torchtune="enable_async_checkpointing",
    )
    save_every_minutes: float = setting(
        0.0, "Also save when this many minutes passed since the last save; 0: off.", range=AT_LEAST_0, meaning=False
    )
    skip_nonfinite: bool = setting(
        False,
        "A non-finite loss or gradient norm skips the batch (counted) instead of stopping the run.",
        meaning=False,
    )
    compile: bool = setting(
        False,
        "torch.compile each decoder layer and the loss (compiles during the first steps).",
        meaning=False,
        torchtune="compile",
    )
    optimizer_in_backward: bool = setting(
        False,
        "Step each parameter in backward and free its gradient (no clipping or accumulation).",
        meaning=False,
        torchtune="optimizer_in_bwd",
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = setting(
        "inductor", "torch.compile's backend; eager or aot_eager to debug a compile.", meaning=False
    )
    keep_last: int = setting(2, "Checkpoints kept (older ones are removed).", range=AT_LEAST_1, meaning=False)
    log_every: int = setting(
        1,
        "Log metrics every this many optimizer steps.",
        range=AT_LEAST_1,
        meaning=False,
        torchtune="log_every_n_steps",
    )


@dataclass
class DistributedConfig:
    reshard_after_forward: bool = setting(
        True,
        "FSDP2: free the gathered parameters after each layer's forward (less memory, one more gather).",
        meaning=False,
        torchtune="fsdp_reshard_after_forward",
    )
    cpu_offload: bool = setting(
        False,
        "FSDP2: keep parameters, gradients and optimizer state in CPU memory.",
        meaning=False,
        torchtune="fsdp_cpu_offload",
    )
    mixed_precision: bool = setting(
        True, "FSDP2: gather parameters in the compute dtype and reduce gradients in fp32.", meaning=False
    )
    timeout_s: float = setting(
        300.0,
        "Several processes: seconds a training step's collective waits for every process; past it the run stops "
        "with one line naming the rank that stopped answering (a hung process, a lost node).",
        range=ABOVE_0,
        meaning=False,
    )
    startup_timeout_s: float = setting(
        1800.0,
        "Several processes: the same wait while loading, through the first step, at evaluations and at checkpoint "
        "saves and exports (rank 0 writes while the others wait).",
        range=ABOVE_0,
        meaning=False,
    )
    cpu_threads: Optional[int] = setting(
        None,
        "CPU only: torch threads per process.",
        range=AT_LEAST_1,
        null="null for the machine's cores, shared among the processes",
        meaning=False,
        flag="--threads",
    )


@dataclass
class EvalConfig:
    samples: int = setting(
        0,
        "Eval prompts the policy answers at every eval (samples.jsonl, the trackers, the summary).",
        range=AT_LEAST_0,
        meaning=False,
    )
    prompts_file: Optional[str] = setting(
        None,
        "More prompts it answers at every eval: .txt lines, or rows with a 'prompt'.",
        null="null for none",
        meaning=False,
    )
    max_new_tokens: int = setting(64, "Tokens per sampled answer.", range=AT_LEAST_1, meaning=False)
    temperature: float = setting(0.0, "Sampling temperature; 0: greedy.", range=AT_LEAST_0, meaning=False)


Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]


@dataclass
class LoggingConfig:
    report_to: list[Tracker] = setting(
        factory=list,  # none by default: each tracker is an optional extra; metrics.jsonl is always written
        doc="Where metrics go besides metrics.jsonl (always written): any of tensorboard, wandb, mlflow, trackio "
        "(optional extras); none by default.",
        meaning=False,
    )
    project: str = setting("dpokit", "W&B and trackio project, MLflow experiment.", meaning=False)
    run_name: Optional[str] = setting(
        None, "The trackers' run name.", null="null for the run directory's name", meaning=False
    )
    mlflow_tracking_uri: Optional[str] = setting(
        None, "MLflow tracking URI.", null="null for MLFLOW_TRACKING_URI, else MLflow's own default", meaning=False
    )


@dataclass
class OutputConfig:
    dir: str = setting(
        "runs/dpo",
        "Run directory (checkpoints, metrics.jsonl, plots).",
        meaning=False,
        flag="--out",
        short="-o",
        torchtune="output_dir",
    )
    merge: bool = setting(
        False, "Also write a merged full model at the end (LoRA family).", meaning=False, flag="--merge"
    )
    resume: bool = setting(False, "Continue from the run's latest checkpoint.", meaning=False, flag="--resume")
    overwrite: bool = setting(
        False, "Start again in a run directory that has a run.", meaning=False, flag="--overwrite"
    )
    allow_config_change: bool = setting(
        False,
        "With --resume: continue although settings that define the run (data, loss, batch, optimizer ...) changed.",
        meaning=False,
        flag="--allow-config-change",
    )


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    loss: dict[str, Any] = setting(
        factory=lambda: {"name": "dpo"},
        doc="The objective: loss.name (a loss of docs/losses.md, a list such as dpo,sft with loss.weights=1,0.5, or "
        "package.module:Class) and its constructor's parameters (loss.beta=0.1 ...). --loss NAME (loss=NAME) replaces "
        "the whole section.",
        flag="--loss",
    )
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# The loss parameters that have their own `dpokit train` flag (the loss section is open, so they are
# declared here rather than on a field). `tests/test_config.py` checks that some built-in loss takes each.
LOSS_FLAGS = (
    ("--beta", "beta", float, "The loss's beta (dpo, simpo, ...)."),
    ("--gamma", "gamma", float, "The loss's gamma (rso, simpo)."),
    ("--tau", "tau", float, "The loss's tau (ipo, discopop)."),
)


# ---------------------------------------------------------------------------------------------
# The schema, walked


@dataclass(frozen=True)
class Setting:
    """One declared key: its dotted name, type, default and the `setting` metadata."""

    key: str
    hint: Any
    default: Any
    doc: str
    range: Optional[Range]
    null: str
    length: Optional[int]
    meaning: bool
    flag: str
    short: str
    torchtune: str


def settings(cls: type = TrainConfig, prefix: str = "") -> Iterator[Setting]:
    """Every key of the config schema, in declaration order (a section's keys after the section)."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        hint = hints[spec.name]
        if dataclasses.is_dataclass(hint):
            yield from settings(hint, f"{prefix}{spec.name}.")
            continue
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        meta = spec.metadata
        yield Setting(
            f"{prefix}{spec.name}",
            hint,
            default,
            meta.get("doc", ""),
            meta.get("range"),
            meta.get("null", ""),
            meta.get("length"),
            meta.get("meaning", True),
            meta.get("flag", ""),
            meta.get("short", ""),
            meta.get("torchtune", ""),
        )


SETTINGS: dict[str, Setting] = {s.key: s for s in settings()}


def changes_meaning(key: str) -> bool:
    """Whether a different value of dotted `key` on ``--resume`` makes a different run. A key the schema
    does not declare (one an older or newer dpokit wrote, a loss parameter) does."""
    setting_ = SETTINGS.get(key) or SETTINGS.get(key.split(".", 1)[0])
    return setting_ is None or setting_.meaning


@dataclass(frozen=True)
class TrainFlag:
    """One `dpokit train` option: its name, the config key it sets, type and help (from the schema)."""

    option: str  # "--data"
    key: str  # "data.path"; a switch sets it to true
    type: Any  # str, int, float or bool (a switch)
    help: str
    short: Optional[str] = None

    @property
    def name(self) -> str:
        return self.option.removeprefix("--").replace("-", "_")


def train_flags() -> tuple[TrainFlag, ...]:
    """`dpokit train`'s options: the settings that declare a flag, then the loss parameters' flags."""
    flags = []
    for s in SETTINGS.values():
        if s.flag:
            hint = s.hint
            if typing.get_origin(hint) is typing.Union:
                hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
            kind = hint if hint in (bool, int, float) else str
            flags.append(TrainFlag(s.flag, s.key, kind, s.doc, s.short or None))
            if s.key == "loss":
                flags += [TrainFlag(option, f"loss.{name}", kind_, help_) for option, name, kind_, help_ in LOSS_FLAGS]
    return tuple(flags)


def torchtune_keys() -> dict[str, str]:
    """torchtune recipe key -> dpokit key, for the keys that map value for value."""
    return {s.torchtune: s.key for s in SETTINGS.values() if s.torchtune}


def type_name(hint: Any) -> str:
    """A key's type as ``dpokit config keys`` shows it: int, float?, [str], one of a|b ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return type_name(next(arg for arg in args if arg is not type(None))) + "?"
    if origin is list:
        return f"[{type_name(args[0])}]"
    if origin is Literal:
        return "|".join(map(str, args))
    if origin is dict:
        return "section"
    return getattr(hint, "__name__", str(hint))


def describe_settings() -> list[tuple[str, str, str, str]]:
    """(key, type, default, what it means) for every key, for ``dpokit config keys``."""
    rows = []
    for s in SETTINGS.values():
        notes = [s.doc]
        if s.range is not None:
            notes.append(f"Allowed: {s.range}{f' ({s.length} values)' if s.length else ''}.")
        if s.null:
            notes.append(f"Set {s.null}.")
        if s.flag:
            notes.append(f"Flag: {s.flag}.")
        if not s.meaning:
            notes.append("May change on --resume.")
        rows.append(
            (
                s.key,
                type_name(s.hint),
                yaml.safe_dump(s.default, default_flow_style=True).strip().removesuffix("...").strip(),
                " ".join(notes),
            )
        )
    return rows


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
        tree = read_config_tree(path.read_text(), source)
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(tree, key, value)
    cfg = build_dataclass(TrainConfig, tree, prefix="", source=source)
    check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size)
    return cfg


def read_config_tree(text: str, source: str) -> dict[str, Any]:
    """A config file's sections, their values still as written (`dpokit.typed_text.Text`)."""
    tree = read_yaml_tree(text, source)
    if not isinstance(tree, dict):
        raise DpokitError(f"{source}: a config must be a mapping of sections, got {type(tree).__name__}")
    return tree


def check_config(cfg: TrainConfig, world_size: int) -> None:
    """The checks that look at more than one key, done once when a config is loaded: the loss section
    builds (its name and parameters), and nothing multi-process training does not support is asked for."""
    from dpokit.losses import build_loss

    build_loss(cfg.loss, shape=None)  # pairs, ranked groups or unpaired: the data decides later, in the recipe
    if cfg.reference.model is not None:
        if cfg.reference.source != "cache":
            raise DpokitError(
                "reference.model needs reference.source=cache: build the cache from it with "
                f"`dpokit ref-logps DATA --model {cfg.reference.model}` and pass reference.cache"
            )
        if cfg.reference.adapter is not None:
            raise DpokitError(
                "reference.model and reference.adapter both name the reference; give one (an adapter's reference is "
                "model.path with it, and the policy starts there)"
            )
    if cfg.training.optimizer_in_backward:
        clashes = [
            (cfg.training.gradient_accumulation_steps != 1, "training.gradient_accumulation_steps=1"),
            (
                cfg.training.max_grad_norm is not None,
                "training.max_grad_norm=null (clipping needs every gradient first)",
            ),
            (
                cfg.training.skip_nonfinite,
                "training.skip_nonfinite=false (the update is applied in backward, before the check)",
            ),
            (world_size > 1, "one process"),
        ]
        needed = [fix for clash, fix in clashes if clash]
        if needed:
            raise DpokitError(f"training.optimizer_in_backward=true needs {', '.join(needed)}; or set it false")


def parse_override(text: str) -> tuple[str, Text]:
    """``optimizer.lr=1e-5`` -> ("optimizer.lr", Text("1e-5")); the key's declared type reads the value later."""
    if "=" not in text:
        raise DpokitError(f"override {text!r} is not key=value (for example optimizer.lr=1e-5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise DpokitError(f"override {text!r} has an empty key")
    return key, Text.of(raw, override=True)


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for key ``a.b``, creating sections as needed. ``loss=NAME`` (an open
    section set as a whole) replaces the section with ``{name: NAME}``."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise DpokitError(f"override {key}: {part!r} is a value, not a section")
        node = child
    if len(parts) == 1 and key == "loss":
        value = {"name": value}
    node[parts[-1]] = value


def build_dataclass(cls: type, data: Any, prefix: str, source: str) -> Any:
    """Build dataclass `cls` from a mapping (values as written, or already typed), checking every key,
    type and range."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        shown = data.text if isinstance(data, Text) else data
        raise DpokitError(
            f"{source}: {prefix.rstrip('.') or 'config'} is a section: set its keys "
            f"({prefix or ''}KEY=VALUE), got {shown!r}"
        )
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
        dotted, hint = f"{prefix}{key}", hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build_dataclass(hint, value, dotted + ".", source)
        elif typing.get_origin(hint) is dict:
            kwargs[key] = read_loss_section(value, dotted, source)
        else:
            kwargs[key] = read_value(hint, value, dotted, source)
            check_range(SETTINGS[dotted], kwargs[key], where(value, source))
    return cls(**kwargs)


def read_loss_section(section: Any, key: str, source: str) -> dict[str, Any]:
    """The open ``loss`` section, each parameter read by the type the named loss's constructor declares
    (for a list of losses, the first that takes it); a parameter no loss declares is read as YAML reads it
    (`dpokit.losses.build_loss` then names what the losses do take)."""
    from dpokit.losses import loss_class, loss_parameter_types

    if not isinstance(section, dict):
        raise DpokitError(f"{source}: {key} must be a mapping such as {{name: dpo, beta: 0.1}}, got {section!r}")
    loss: dict[str, Any] = {}
    raw_name = section.get("name", "dpo")
    listed = isinstance(raw_name, list) or (
        isinstance(raw_name, Text)
        and ("," in raw_name.text or raw_name.text.startswith("["))
        and ":" not in raw_name.text
    )
    loss["name"] = read_value(list[str] if listed else str, raw_name, f"{key}.name", source)
    names = loss["name"] if listed else [loss["name"]]
    types: dict[str, Any] = {}
    for name in reversed(names):
        types.update(loss_parameter_types(loss_class(name)))
    for param, value in section.items():
        if param == "name":
            continue
        hint = list[float] if param == "weights" else types.get(param, Any)
        loss[param] = read_value(hint, value, f"{key}.{param}", source)
    return loss


def check_range(spec: Setting, value: Any, where: str) -> None:
    """Refuse a value outside the key's declared range (each item of a list) or a list of the wrong length,
    naming the key, the value and what is allowed (after `where`: the file, or nothing for an override)."""
    if value is None:
        return
    if isinstance(value, list):
        if spec.length is not None and len(value) != spec.length:
            raise DpokitError(f"{where}{spec.key} must have {spec.length} values, got {value!r}")
        items = [(f"{spec.key}[{index}]", item) for index, item in enumerate(value)]
    else:
        items = [(spec.key, value)]
    if spec.range is None:
        return
    for name, item in items:
        if item not in spec.range:  # NaN is in no range
            alternative = f" (or {spec.null})" if spec.null else ""
            raise DpokitError(f"{where}{name}={item!r} is out of range; it must be {spec.range}{alternative}")


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


def config_from_dict(tree: dict[str, Any], source: str) -> TrainConfig:
    """A config saved by `config_to_dict` (a checkpoint's), rebuilt and checked as a loaded one."""
    return build_dataclass(TrainConfig, tree, prefix="", source=source)


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
