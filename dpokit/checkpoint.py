"""Checkpoints: PEFT adapters or HF full models in safetensors, plus the state a resume needs.

A checkpoint is ``RUN/checkpoints/step_0000004/``. It is written under a temporary name and renamed
only once complete, so a run killed while saving leaves nothing that `latest_checkpoint` trusts.
The training state (optimizer, scheduler, sampler position, RNG) is keyed by parameter names, not
by rank, so a run saved with N processes resumes with any other number.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from dpokit.artifacts import remove_within, replace_within
from dpokit.distributed import any_rank
from dpokit.errors import DpokitError
from dpokit.optim import OptimizerInBackward

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:07d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def full_model_state(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU; collective under FSDP, so every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if isinstance(optimizer, OptimizerInBackward):  # one process: per-parameter states by name
        return optimizer.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    training_state: dict[str, Any],
    adapters: bool,
    tokenizer=None,
    keep_last: int = 2,
    is_main: bool = True,
) -> Path:
    """Write checkpoint `step` (model + optimizer + `training_state`); keep only the last `keep_last`.

    Every rank calls this (gathering the sharded state is collective); only the main rank writes.
    """
    model_state = full_model_state(model, trainable_only=adapters)
    optimizer_state = full_optimizer_state(model, optimizer)
    final = checkpoint_path(run_dir, step)
    if not is_main:
        return final

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_pretrained(model, tmp, model_state, tokenizer)
        torch.save({**training_state, "optimizer": optimizer_state, "rng": rng_state()}, tmp / STATE_FILE)

    final.parent.mkdir(parents=True, exist_ok=True)
    try:  # the same step saved again (a resumed run) is swapped in whole
        replace_within(run_dir, "run", final, write)
    except (OSError, RuntimeError) as exc:  # disk full, quota, permissions (torch.save reports some as RuntimeError)
        previous = latest_checkpoint(run_dir)
        raise DpokitError(
            f"cannot write checkpoint {final} ({exc}); free space or fix the directory, then resume from "
            f"{previous or 'the start (no checkpoint yet)'} with --resume"
        ) from None
    remove_within(run_dir, "run", [old for _, old in list_checkpoints(run_dir)[:-keep_last]])
    return final


def check_finite_weights(model, step: int, device: torch.device) -> None:
    """Refuse to save non-finite trainable weights (every rank checks its shard; all agree)."""
    finite = [torch.isfinite(p.detach().to_local() if hasattr(p, "to_local") else p.detach()).all()
              for p in model.parameters() if p.requires_grad]
    bad = bool(finite) and not bool(torch.stack(finite).all())  # one device sync, not one per tensor
    if any_rank([bad], device)[0]:
        raise DpokitError(f"step {step}: the weights are not finite; refusing to save them over the last good checkpoint")


def save_pretrained(model: nn.Module, out_dir: Path, state_dict: dict[str, torch.Tensor], tokenizer=None) -> None:
    """A PEFT adapter directory (LoRA family) or an HF model directory (full), in safetensors."""
    model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)


def load_model_weights(model: nn.Module, checkpoint: Path, adapters: bool) -> None:
    """Load a checkpoint's weights into the (not yet sharded) policy."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    if adapters:
        from peft import set_peft_model_state_dict

        weights = checkpoint / "adapter_model.safetensors"
        if not weights.is_file():
            raise DpokitError(f"{checkpoint}: no adapter_model.safetensors; was it saved by a full fine-tuning run?")
        result = set_peft_model_state_dict(model, load_file(str(weights)))
        missing = [k for k in getattr(result, "unexpected_keys", [])]
        if missing:
            raise DpokitError(f"{checkpoint}: adapter weights do not fit this model ({missing[:3]} ...)")
        return
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise DpokitError(f"{checkpoint}: no model safetensors; was it saved by a LoRA run?")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    incompatible = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in incompatible.missing_keys if k not in tied]
    if missing or incompatible.unexpected_keys:
        raise DpokitError(
            f"{checkpoint}: weights do not match the model (missing {missing[:3]}, unexpected {incompatible.unexpected_keys[:3]})"
        )


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if isinstance(optimizer, OptimizerInBackward):
        optimizer.load_state_dict(state)
        return
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=options)


def export_merged(checkpoint: Path, base_model: str, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Merge a LoRA-family adapter into its base and save a full HF model (with the tokenizer) in `out_dir`.

    `out_dir` must not exist: `dpokit.export.export_run` passes a temporary sibling and renames it.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = Path(checkpoint)
    if not (checkpoint / "adapter_config.json").is_file():
        raise DpokitError(f"{checkpoint} is not a PEFT adapter; a full fine-tuning checkpoint is already a full model")
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(checkpoint)).merge_and_unload()
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer_dir = checkpoint if (checkpoint / "tokenizer_config.json").is_file() else base_model
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out_dir))
    return Path(out_dir)
