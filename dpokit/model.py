"""Load causal LMs for the reference and the policy: full, LoRA, DoRA, QLoRA and QDoRA via peft.

The compute device and dtype follow the machine: CUDA with bfloat16 when present, CPU with float32
otherwise, unless the config names a dtype.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from dpokit.errors import DpokitError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
QUANTIZED_METHODS = ("qlora", "qdora")
ADAPTER_METHODS = ("lora", "dora", "qlora", "qdora")


def default_device() -> torch.device:
    """`cuda:<LOCAL_RANK>` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DpokitError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_model_path(path: str) -> None:
    local = Path(path)
    looks_local = path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").is_file():
        raise DpokitError(f"model {path}: no config.json there; give a transformers model directory or a hub name")


def load_causal_lm(
    path: str,
    dtype: torch.dtype,
    device: torch.device,
    attn_implementation: str = "sdpa",
    quantization_config=None,
) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained` with dpokit's defaults and a clear error on a bad path."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # dpokit shows its own progress; a weight-loading bar is noise
    _check_model_path(path)
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise DpokitError(f"cannot load model {path!r}: {exc}") from None
    if quantization_config is None:
        model.to(device)
    return model


def load_reference(
    path: str,
    dtype: torch.dtype,
    device: torch.device,
    adapter: Optional[str] = None,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A frozen reference model in eval mode; `adapter` (a PEFT directory) is merged in if given."""
    model = load_causal_lm(path, dtype, device, attn_implementation)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise DpokitError(f"adapter {adapter}: no adapter_config.json; give a PEFT adapter directory")
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    model.requires_grad_(False)
    return model


def quantization_config(compute_dtype: torch.dtype):
    """NF4 with double quantisation (the QLoRA recipe); needs a bitsandbytes build for this device."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise DpokitError(f"model.method=qlora needs bitsandbytes ({exc}); `pip install bitsandbytes` or use method=lora") from None
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


def load_policy(model_cfg, lora_cfg, device: torch.device) -> nn.Module:
    """The trainable policy: a full model, or the base with LoRA/DoRA adapters (4-bit base for q*)."""
    dtype = resolve_dtype(model_cfg.dtype, device)
    method = model_cfg.method
    quant = quantization_config(dtype) if method in QUANTIZED_METHODS else None
    model = load_causal_lm(model_cfg.path, dtype, device, model_cfg.attn_implementation, quant)
    model.config.use_cache = False
    if method == "full":
        model.requires_grad_(True)
    else:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if quant is not None:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        try:
            with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
                warnings.simplefilter("ignore", FutureWarning)
                model = get_peft_model(model, lora_config(lora_cfg, use_dora=method in ("dora", "qdora")))
        except ValueError as exc:
            raise DpokitError(f"lora.target_modules={lora_cfg.target_modules}: {exc}") from None
    if model_cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            model.enable_input_require_grads()
    model.train()
    return model


def uses_adapters(method: str) -> bool:
    return method in ADAPTER_METHODS
