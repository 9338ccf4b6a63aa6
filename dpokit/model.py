"""Load causal LMs for the reference and the policy: full, LoRA, DoRA, QLoRA and QDoRA via peft.

The compute device and dtype follow the machine: CUDA with bfloat16 when present, CPU with float32
otherwise, unless the config names a dtype.
"""

from __future__ import annotations

import os
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
