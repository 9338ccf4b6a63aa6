"""Load causal LMs for the reference and the policy: full, LoRA, DoRA, QLoRA and QDoRA via peft.

The compute device and dtype follow the machine: CUDA with bfloat16 when present, CPU with float32
otherwise, unless the config names a dtype. Full fine-tuning in a 16-bit compute dtype keeps fp32
master weights by default (``model.precision=mixed``: the forward runs under autocast, or FSDP2
gathers 16-bit copies); ``precision=pure`` stores the weights in the 16-bit dtype. The policy's
dropout is off unless ``model.disable_dropout=false``. With ``reference.adapter`` the policy starts
from that adapter, as the reference does.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from dpokit.config import ADAPTER_METHODS, QUANTIZED_METHODS
from dpokit.errors import DpokitError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def default_device() -> torch.device:
    """`cuda:<LOCAL_RANK>` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device, planned: bool = False) -> torch.dtype:
    """``auto`` is bfloat16 on a CUDA device that supports it (``torch.cuda.is_bf16_supported()``: not before
    Ampere) and float32 otherwise (on CPU, and on older GPUs, where float16 would need loss scaling);
    otherwise the named dtype, refused where the device cannot compute in it. A `planned` device (`dpokit
    plan`'s) is not this machine's: a CUDA one is taken to support bfloat16."""
    bf16 = device.type == "cuda" and (planned or torch.cuda.is_bf16_supported())
    if name == "auto":
        return torch.bfloat16 if bf16 else torch.float32
    if name == "bfloat16" and device.type == "cuda" and not bf16:
        raise DpokitError(
            f"model.dtype=bfloat16: {torch.cuda.get_device_name(device)} does not compute in bfloat16 (it needs an "
            "Ampere or newer GPU); use model.dtype=float32 (or auto)"
        )
    if name not in DTYPES:
        raise DpokitError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_model_path(path: str) -> None:
    """Raise one line when `path` looks like a local folder (or exists) but holds no model's config.json."""
    local = Path(path)
    looks_local = path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").is_file():
        raise DpokitError(f"model {path}: no config.json there; give a transformers model directory or a hub name")


def load_causal_lm(
    path: str,
    dtype: torch.dtype,
    device: torch.device,
    attn_implementation: str = "auto",
    quantization_config=None,
) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained` with dpokit's defaults and a clear error on a bad path.

    ``attn_implementation="auto"`` lets transformers pick the family's default (SDPA where supported,
    eager otherwise, e.g. Gemma 2); the choice made is ``model.config._attn_implementation``.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # dpokit shows its own progress; a weight-loading bar is noise
    check_model_path(path)
    kwargs = dict(dtype=dtype, attn_implementation=None if attn_implementation == "auto" else attn_implementation)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise DpokitError(f"cannot load model {path!r}: {exc}") from exc
    except ValueError as exc:
        if "attn_implementation" in str(exc) or "attention" in str(exc).lower():
            raise DpokitError(
                f"model {path}: attn_implementation={attn_implementation} is not supported for this family ({exc}); "
                "use auto"
            ) from exc
        raise
    if quantization_config is None:
        model.to(device)
    return model


def load_reference(
    path: str,
    dtype: torch.dtype,
    device: torch.device,
    adapter: Optional[str] = None,
    attn_implementation: str = "auto",
) -> nn.Module:
    """A frozen reference model in eval mode; `adapter` (a PEFT directory) is merged in if given."""
    model = load_causal_lm(path, dtype, device, attn_implementation)
    if adapter:
        model = merged_adapter(model, adapter)
    model.eval()
    model.requires_grad_(False)
    return model


def load_reference_sharded(
    path: str,
    dtype: torch.dtype,
    device: torch.device,
    shard,
    adapter: Optional[str] = None,
    attn_implementation: str = "auto",
) -> nn.Module:
    """`load_reference`'s frozen model, sharded by `shard` (FSDP2's `apply_fsdp`) so that no device holds it whole.

    Without an adapter it is built on the meta device, sharded, and each rank reads only its shards' rows from
    the safetensors files (`fill_shards`), so no process holds it whole either. With an adapter the merge
    needs the whole model: it is merged in CPU memory, then sharded and moved to `device`.
    """
    if adapter or safetensors_files(path) is None:
        model = load_reference(path, dtype, torch.device("cpu"), adapter, attn_implementation)
        shard(model)
        return model.to(device)
    model = causal_lm_on_meta(path, dtype, attn_implementation)
    readers = safetensors_readers(path)
    missing = [name for name, _ in model.named_parameters() if name not in readers]
    if missing:
        raise DpokitError(f"{path}: the safetensors files lack {missing[:3]}; run without --shard-model")
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.requires_grad_(False)
    shard(model)
    model.to_empty(device=device)
    fill_shards(model, readers, {}, buffers)
    model.eval()
    return model


def check_adapter_dir(adapter: str) -> None:
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise DpokitError(f"adapter {adapter}: no adapter_config.json; give a PEFT adapter directory")


def merged_adapter(model: nn.Module, adapter: str) -> nn.Module:
    """`model` with the PEFT adapter at `adapter` merged into its weights."""
    from peft import PeftModel

    check_adapter_dir(adapter)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


# Modules whose train mode draws random numbers beyond dropout: router noise on the hidden states (Mixtral,
# MiniMax, DBRX, Switch), Gumbel-sampled routing (PhiMoE's sparsemixer), random attention blocks (BigBird). `disable_dropout` keeps them in eval
# mode, where they route as the reference does. `tests/test_families.py` scans transformers for others.
STOCHASTIC_IN_TRAIN_MODE = frozenset(
    {
        "BigBirdBlockSparseAttention",  # random attention blocks drawn anew in train mode
        "BigBirdPegasusBlockSparseAttention",
        "DbrxRouter",
        "MiniMaxM2SparseMoeBlock",
        "MiniMaxSparseMoeBlock",
        "MixtralSparseMoeBlock",
        "PhimoeSparseMoeBlock",
        "PhimoeTopKRouter",
        "Phi4MultimodalAudioModel",  # skips its audio projection at random in train mode
        "SwitchTransformersTop1Router",
    }
)
# Float settings that are train-mode randomness, in modules and in the model config: dropout, GPT-2's
# resid/embd/attn pdrop, LayerDrop's skipped layers (OPT, XGLM, BioGPT ...), stochastic depth.
RANDOM_SETTINGS = ("dropout", "pdrop", "layerdrop", "drop_path")


def disable_dropout(model: nn.Module) -> int:
    """Turn off `model`'s train-mode randomness: every dropout, LayerDrop and stochastic-depth rate set to 0
    (modules, attention floats, config), and the modules of `STOCHASTIC_IN_TRAIN_MODE` kept in eval mode.
    Returns how many were on. The policy then computes in train mode what the reference computes in eval.

    Call it before adding LoRA adapters: their dropout is a LoRA setting and stays.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            changed += module.p > 0
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_random_setting(name, value):
                changed += value > 0
                setattr(module, name, 0.0)
        if type(module).__name__ in STOCHASTIC_IN_TRAIN_MODE:
            changed += 1
            _keep_in_eval_mode(module)
    config = getattr(model, "config", None)
    for name, value in vars(config).items() if config is not None else ():
        if _is_random_setting(name, value):
            setattr(config, name, 0.0)
    return int(changed)


def _is_random_setting(name: str, value) -> bool:
    return (
        any(word in name.lower() for word in RANDOM_SETTINGS)
        and isinstance(value, float)
        and not isinstance(value, bool)
    )


def _keep_in_eval_mode(module: nn.Module) -> None:
    """`module` in eval mode from now on: ``model.train()`` leaves it (and its children) as they are."""
    module.train(False)
    module.train = lambda mode=True: module  # nn.Module.train calls each child's train(mode)


def training_dtypes(model_cfg, device: torch.device, planned: bool = False) -> tuple[torch.dtype, torch.dtype]:
    """``(parameter dtype, compute dtype)`` of the policy (see the module docstring); `planned` as `resolve_dtype`.

    float16 is refused for training: it needs loss scaling, which dpokit does not do; bfloat16 has
    float32's range and needs none.
    """
    compute = resolve_dtype(model_cfg.dtype, device, planned)
    if compute == torch.float16:
        raise DpokitError(
            "model.dtype=float16 is not supported for training (it needs loss scaling); use bfloat16 "
            "(or float32 on hardware without bf16)"
        )
    if model_cfg.method == "full" and model_cfg.precision == "mixed":
        return torch.float32, compute
    return compute, compute


def quantization_config(compute_dtype: torch.dtype):
    """NF4 with double quantisation (the QLoRA recipe); needs a bitsandbytes build for this device."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise DpokitError(
            f"model.method=qlora needs bitsandbytes ({exc}); `pip install bitsandbytes` or use method=lora"
        ) from exc
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,  # lets FSDP shard the packed weights like any other tensor
    )


def lora_config(lora, use_dora: bool):
    """A peft `LoraConfig` from dpokit's `lora` config section."""
    from peft import LoraConfig

    targets = lora.target_modules
    target_modules = "all-linear" if targets == ["all-linear"] else list(targets)
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )


def load_policy(model_cfg, lora_cfg, device: torch.device, adapter: Optional[str] = None) -> nn.Module:
    """The trainable policy: a full model, or the base with LoRA/DoRA adapters (4-bit base for q*).

    Args:
        adapter: ``reference.adapter``, the PEFT adapter the reference includes. The policy starts
            from the same weights: LoRA-family methods continue training that adapter (its own rank,
            alpha and target modules; ``lora.*`` do not apply), full fine-tuning starts from the
            base with the adapter merged in.
    """
    params_dtype, compute_dtype = training_dtypes(model_cfg, device)
    quant = quantization_config(compute_dtype) if model_cfg.method in QUANTIZED_METHODS else None
    model = load_causal_lm(model_cfg.path, params_dtype, device, model_cfg.attn_implementation, quant)
    return trainable_policy(model, model_cfg, lora_cfg, adapter, quantized=quant is not None)


def trainable_policy(
    model: nn.Module, model_cfg, lora_cfg, adapter: Optional[str] = None, quantized: bool = False
) -> nn.Module:
    """`model` made the policy ``model.method`` trains: dropout off, LoRA/DoRA adapters (or all weights
    trainable), activation checkpointing."""
    method = model_cfg.method
    model.config.use_cache = False
    if model_cfg.disable_dropout:
        disable_dropout(model)
    if method == "full":
        if adapter:
            model = merged_adapter(model, adapter)
        model.requires_grad_(True)
    else:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if quantized:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        use_dora = method in ("dora", "qdora")
        try:
            with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
                warnings.simplefilter("ignore", FutureWarning)
                if adapter:
                    model = continued_adapter(model, adapter, use_dora, method)
                else:
                    model = get_peft_model(model, lora_config(lora_cfg, use_dora=use_dora))
        except ValueError as exc:
            raise DpokitError(f"lora.target_modules={lora_cfg.target_modules}: {exc}") from exc
    if model_cfg.activation_checkpointing:
        # transformers 5.x renamed it (the old name warns, and goes in v6); 4.x has only the old one
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        if method != "full":
            model.enable_input_require_grads()
    model.train()
    return model


# ----------------------------------------------------------------------------------------------
# Lean loading: build on the meta device, shard, then fill each rank's shards


LEAN_METHODS = ("full", "lora")


def lean_loading_blocker(model_cfg, adapter: Optional[str], compile: bool) -> Optional[str]:
    """Why this policy cannot be built on the meta device and filled shard by shard (None: it can)."""
    if model_cfg.method not in LEAN_METHODS:
        return (
            f"model.method={model_cfg.method} (its weights need the whole base model: 4-bit packing, DoRA magnitudes)"
        )
    if adapter:
        return "reference.adapter (the adapter is merged into, or continued from, the whole model)"
    if compile:
        return "training.compile (the layers are compiled before they are sharded)"
    if safetensors_files(model_cfg.path) is None:
        return f"{model_cfg.path} has no local safetensors files"
    return None


def safetensors_files(path: str) -> Optional[list[Path]]:
    """The safetensors files of a local model directory (None: it has none)."""
    import json

    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def load_policy_sharded(model_cfg, lora_cfg, device: torch.device, shard) -> nn.Module:
    """The policy as `load_policy` makes it, without any process ever holding the whole model.

    The model is built on the meta device (buffers such as rotary tables are computed for real) and
    LoRA adapters are initialised on CPU exactly as peft does; `shard` (FSDP2's `apply_fsdp`) shards it;
    then each rank allocates only its own shards and fills them, one tensor at a time, from the
    safetensors files (base weights) or the adapters' initial values.
    """
    params_dtype, _ = training_dtypes(model_cfg, device)
    base = causal_lm_on_meta(model_cfg.path, params_dtype, model_cfg.attn_implementation)
    readers = safetensors_readers(model_cfg.path)
    base_names = {name for name, _ in base.named_parameters()}
    # Weights that take no memory (one value, strided 0) but look real to peft, so it creates its adapters on CPU.
    replace_parameters(base, lambda p: torch.zeros((), dtype=p.dtype).expand(p.shape))
    model = trainable_policy(
        base, model_cfg, lora_cfg
    )  # adapters drawn from the RNG exactly as `load_policy` draws them
    initial = {
        name: p.detach().clone() for name, p in model.named_parameters() if checkpoint_key(name) not in base_names
    }
    missing = [
        checkpoint_key(n) for n, _ in model.named_parameters() if n not in initial and checkpoint_key(n) not in readers
    ]
    if missing:
        raise DpokitError(f"{model_cfg.path}: the safetensors files lack {missing[:3]}; set model.lean_loading=false")
    replace_parameters(model, lambda p: torch.empty_like(p, device="meta"))
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    shard(model)
    model.to_empty(device=device)
    fill_shards(model, readers, initial, buffers)
    return model


def causal_lm_on_meta(path: str, dtype: torch.dtype, attn_implementation: str = "auto") -> nn.Module:
    """The causal LM of `path`'s config with its parameters on the meta device (buffers such as rotary tables are
    computed for real): nothing allocated until the shards are."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    check_model_path(path)
    config = AutoConfig.from_pretrained(path)
    attn = None if attn_implementation == "auto" else attn_implementation
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)


def safetensors_readers(path: str) -> dict[str, "SafetensorsRows"]:
    """Checkpoint key -> a reader of the safetensors file holding it (each file's header read once)."""
    return {
        key: reader
        for reader in map(SafetensorsRows, safetensors_files(path))
        for key in reader.header
        if key != "__metadata__"
    }


def replace_parameters(model: nn.Module, new) -> None:
    """Give every parameter of `model` the tensor ``new(param)`` (same trainability; tied parameters stay tied)."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in replaced:
                replaced[id(param)] = nn.Parameter(new(param.detach()), requires_grad=param.requires_grad)
            setattr(module, name, replaced[id(param)])


def checkpoint_key(name: str) -> str:
    """The safetensors key of a policy parameter: without peft's wrapping (``base_model.model.``, ``.base_layer``)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def fill_shards(
    model: nn.Module,
    readers: dict[str, "SafetensorsRows"],
    initial: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
) -> None:
    """Copy into each parameter's local shard its rows of the full tensor (from `initial`, else read from the
    file that holds its checkpoint key: only those rows), and put the buffers back."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            start, stop = shard_rows(param)
            key = checkpoint_key(name)
            rows = initial[name][start:stop] if name in initial else readers[key].rows(key, start, stop)
            local.copy_(rows)
        for name, buffer in model.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name])


def shard_rows(param: torch.Tensor) -> tuple[int, int]:
    """The rows ``[start, stop)`` of the full parameter that this rank's shard holds: all of them, or FSDP2's
    dim-0 chunk (``torch.chunk``: ceil(rows / ranks) a rank, the last ones shorter or empty)."""
    from torch.distributed.tensor import DTensor, Shard

    rows = param.shape[0] if param.dim() else 1
    if not isinstance(param, DTensor):
        return 0, rows
    (placement,) = param.placements
    if not isinstance(placement, Shard) or placement.dim != 0:
        raise DpokitError(
            f"lean loading expects FSDP2's dim-0 shards, got {param.placements}; set model.lean_loading=false"
        )
    chunk = -(-rows // param.device_mesh.size())
    start = min(rows, chunk * param.device_mesh.get_local_rank())
    stop = min(rows, start + chunk)
    if param.to_local().shape[0] != stop - start:
        raise DpokitError(f"lean loading: a shard of {rows} rows is not FSDP2's chunk; set model.lean_loading=false")
    return start, stop


class SafetensorsRows:
    """Rows of the tensors of one safetensors file, read with plain file reads: only the bytes asked for
    are read, and nothing is memory-mapped (mapped pages would count in every rank's resident set)."""

    DTYPES = {
        "F32": torch.float32,
        "BF16": torch.bfloat16,
        "F16": torch.float16,
        "F64": torch.float64,
        "I64": torch.int64,
        "I32": torch.int32,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }

    def __init__(self, path: Path):
        import json
        import struct

        self.path = Path(path)
        with self.path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            self.header = json.loads(handle.read(size))
        self.data_start = 8 + size

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        entry = self.header[key]
        dtype, shape = self.DTYPES[entry["dtype"]], entry["shape"]
        row_numel = 1
        for size in shape[1:]:
            row_numel *= size
        row_bytes = row_numel * torch.empty((), dtype=dtype).element_size()
        begin = self.data_start + entry["data_offsets"][0] + start * row_bytes
        data = bytearray((stop - start) * row_bytes)
        with self.path.open("rb") as handle:
            handle.seek(begin)
            handle.readinto(data)
        flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return flat.reshape(stop - start, *shape[1:]) if shape else flat.reshape(())


def continued_adapter(model: nn.Module, adapter: str, use_dora: bool, method: str) -> nn.Module:
    """`model` with the PEFT adapter at `adapter` loaded trainable (DPO continues the SFT adapter)."""
    import json

    from peft import PeftModel

    check_adapter_dir(adapter)
    saved = json.loads((Path(adapter) / "adapter_config.json").read_text())
    if bool(saved.get("use_dora", False)) != use_dora:
        kind = "a DoRA" if saved.get("use_dora") else "a LoRA"
        fitting = "dora" if saved.get("use_dora") else "lora"
        raise DpokitError(
            f"reference.adapter {adapter} is {kind} adapter but model.method={method}; the policy continues "
            f"that adapter, so use model.method={fitting} (or q{fitting} for a 4-bit base)"
        )
    return PeftModel.from_pretrained(model, adapter, is_trainable=True)


def uses_adapters(method: str) -> bool:
    return method in ADAPTER_METHODS


def pad_token_id(model: nn.Module) -> int:
    """The id that fills padding, the one rule for the reference pass and training: the model config's
    pad token, else its (first) end-of-sequence token, else 0. Any id works, as padding is masked out;
    it only has to be in the vocabulary."""
    config = model.config
    for token in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(token, (list, tuple)):
            token = token[0] if token else None
        if token is not None:
            return int(token)
    return 0


def stop_token_ids(model: nn.Module, tokenizer) -> set[int]:
    """The ids that end a generated reply, as `generate` reads them: the generation config's and the model
    config's end-of-sequence tokens (one or a list), and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        token = getattr(source, "eos_token_id", None)
        ids.update(token if isinstance(token, (list, tuple)) else [] if token is None else [token])
    return {int(t) for t in ids}


def block_bitsandbytes_import() -> None:
    """Keep bitsandbytes out of this process: peft and transformers import it whenever it is installed,
    which costs about a second (it compiles kernels with torch's compiler at import) and prints a warning
    about a missing `kernels` package. ``sys.modules["bitsandbytes"] = None`` is Python's own way to
    block an import: ``find_spec`` then reports it absent and ``import`` raises ImportError.

    Only for a process that runs one job which needs no 4-bit weights and no 8-bit optimizer (a recipe
    run as a script, a worker of several processes): the block lasts as long as the process. No-op when
    bitsandbytes is already imported.
    """
    import sys

    sys.modules.setdefault("bitsandbytes", None)


def compile_layers(model: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` each decoder layer of `model` in place, as torchtune does: one graph per layer, reused by
    every layer of the same code and recompiled for new shapes as they come. Returns the number of layers."""
    from dpokit.distributed import decoder_layers

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
