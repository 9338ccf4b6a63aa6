"""Checkpoints: the sharded training state every rank writes, and the model in Hugging Face's format.

A checkpoint is ``RUN/checkpoints/step_0000004/``:

- ``shards/``: the trainable weights and the optimizer state, written with `torch.distributed.checkpoint`
  (DCP) by every rank in parallel, each its own shard: no rank ever holds the whole optimizer state. DCP
  keys them by parameter name, so a run saved with N processes resumes with any other number (it reshards).
- ``training_state.pt`` (rank 0): step, sampler, scheduler, the loss's statistics, the config, and the RNG
  state of every rank.
- the model, consolidated: a PEFT adapter (LoRA family: small, in every checkpoint) or a full model in
  safetensors (full fine-tuning: only in the run's last checkpoint, since gathering it costs a pass over
  the whole model on rank 0; `consolidate_checkpoint` and `dpokit export` make it from the shards).

It is written into a temporary sibling that every rank fills and rank 0 renames once complete, so a run
killed while saving leaves nothing that `latest_checkpoint` trusts.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dpokit.artifacts import abort_within, begin_within, commit_within, remove_within
from dpokit.distributed import any_rank, gather_to_main, main_result
from dpokit.errors import DpokitError
from dpokit.optim import OptimizerInBackward
from dpokit.shard_reader import SINGLE_PROCESS_WARNING, load_shards, shard_damage

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
SHARDS = "shards"  # DCP: the trainable weights and the optimizer state, one file per rank
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


DIGESTS_FILE = "digests.json"  # CRC-32 of the small files a resume reads first (training state, shard metadata)
_DIGESTED = (STATE_FILE, f"{SHARDS}/.metadata")


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_digests(checkpoint: Path) -> None:
    """Record the CRC-32 of the checkpoint's training state and shard metadata (inside its temporary directory)."""
    digests = {name: _crc32(checkpoint / name) for name in _DIGESTED if (checkpoint / name).is_file()}
    (checkpoint / DIGESTS_FILE).write_text(json.dumps(digests))


def checkpoint_damage(checkpoint: Path) -> Optional[str]:
    """Why `checkpoint` cannot be resumed from (no ``digests.json``; a training state or shard metadata whose CRC-32
    differs from the one recorded when it was written, or that does not load; shard files missing or cut short),
    or None when it is intact as far as can be told without reading every tensor. (The shard files' own bytes
    carry no digest: hashing every rank's shards on each save would read the whole state again.)"""
    # First the shards' metadata through the safe unpickler: a file carrying code is refused as such
    # (`UnsafeCheckpoint`), not taken for damage and skipped.
    shards = shard_damage(Path(checkpoint) / SHARDS)
    digests_path = Path(checkpoint) / DIGESTS_FILE
    if not digests_path.is_file():
        return f"{digests_path} is missing"
    for name, recorded in json.loads(digests_path.read_text()).items():  # the training state is not loaded to tell
        path = Path(checkpoint) / name
        if not path.is_file():
            return f"{path} is missing"
        if _crc32(path) != recorded:
            return f"{path} has changed since it was written (CRC-32 differs)"
    return shards


def newest_intact_checkpoint(run_dir: Path, announce=print) -> Optional[Path]:
    """The newest checkpoint of `run_dir` that is intact (`checkpoint_damage`), saying which newer ones are
    damaged and skipped; None when there is none. Raises when every checkpoint is damaged."""
    checkpoints = list_checkpoints(run_dir)
    damaged = []
    for _, checkpoint in reversed(checkpoints):
        why = checkpoint_damage(checkpoint)
        if why is None:
            for name, reason in damaged:
                announce(
                    f"checkpoint {name} is damaged ({reason}); resuming from {checkpoint.name}, the newest intact one"
                )
            return checkpoint
        damaged.append((checkpoint.name, why))
    if damaged:
        raise DpokitError(
            f"every checkpoint of {run_dir} is damaged (newest: {damaged[0][0]}: {damaged[0][1]}); "
            "start again with --overwrite, or restore a checkpoint from a copy"
        )
    return None


def full_model_state(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU; collective under FSDP, so every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool) -> dict[str, Any]:
    """Each rank's shards of the trainable weights and the optimizer state, keyed by parameter name (what DCP
    saves, and the template it loads into). An optimizer stepped inside backward (one process) keeps its own
    state in ``training_state.pt``."""
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    state = {"model": get_model_state_dict(model, options=options)}
    if not isinstance(optimizer, OptimizerInBackward):
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=options)
    return state


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


class PendingCheckpoint:
    """A checkpoint whose shards are being written (`save_checkpoint(asynchronous=True)`); `wait` completes it."""

    def __init__(self, path: Path, written, finish):
        self.path, self._written, self._finish = path, written, finish

    def written(self) -> bool:
        """Whether this rank's shards are on disk (the others' may not be: agree before `wait`)."""
        return self._written is None or self._written.done()

    def wait(self) -> Path:
        """Wait for every rank's shards, then rank 0 adds the training state and renames the checkpoint into place."""
        if self._written is not None:
            try:
                self._written.result()
            except (OSError, RuntimeError, CheckpointException) as exc:
                self._finish(failed=exc)
        self._finish(failed=None)
        return self.path


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    training_state: dict[str, Any],
    adapters: bool,
    load_tokenizer: Optional[Callable[[], Any]] = None,
    keep_last: int = 2,
    is_main: bool = True,
    consolidate: bool = True,
    asynchronous: bool = False,
    write_group=None,
) -> PendingCheckpoint:
    """Start checkpoint `step`; keep only the last `keep_last` once it is complete (`PendingCheckpoint.wait`).
    Every rank calls this: each writes its shards into the temporary directory rank 0 opens, and rank 0 adds
    ``training_state.pt`` (and, with `consolidate`, the consolidated model) and renames it into place once all
    are done.

    Args:
        load_tokenizer: returns the tokenizer written beside the model; called (on the main rank) only when the
            model is written in Hugging Face's format, so a run loads no tokenizer for its other checkpoints.
        consolidate: also write the model in Hugging Face's format (always done for adapters, which are small).
        asynchronous: copy the shards to host memory now and write them in a background thread (DCP's
            ``async_save``, over `write_group`, a process group of its own so that its collectives never mix
            with training's); training goes on until `wait`.
    """
    model_state = full_model_state(model, trainable_only=adapters) if consolidate or adapters else None  # collective
    tokenizer = load_tokenizer() if load_tokenizer is not None and model_state is not None and is_main else None
    if asynchronous and model_state is not None:  # one process's "full" state shares the live weights' storage
        model_state = {name: tensor.clone() for name, tensor in model_state.items()}
    own = {"optimizer_in_backward": optimizer.state_dict()} if isinstance(optimizer, OptimizerInBackward) else {}
    training_state = {**training_state, **own, "rng": gather_to_main(rng_state())}  # rank r resumes with its own
    final = checkpoint_path(run_dir, step)

    def begin() -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = begin_within(run_dir, "run", final)
        tmp.mkdir()
        return tmp

    tmp = Path(main_result(_saving(final, begin)))  # a refusal or a full disk on rank 0 stops every rank

    def finish(failed: Optional[BaseException]) -> None:
        if failed is not None:  # DCP raises on every rank when one fails
            if is_main:
                abort_within(tmp)
            raise _cannot_write(final, Path(run_dir), failed) from failed

        def complete() -> None:
            try:
                if model_state is not None:
                    save_pretrained(model, tmp, model_state, tokenizer)
                torch.save(training_state, tmp / STATE_FILE)
                write_digests(tmp)
                commit_within(tmp, final)
            except BaseException:
                abort_within(tmp)
                raise
            remove_within(run_dir, "run", [old for _, old in list_checkpoints(run_dir)[:-keep_last]])

        main_result(_saving(final, complete))  # rank 0 completes it; the others return once it is in place

    shards = sharded_state(model, optimizer, trainable_only=adapters)
    try:
        with warnings.catch_warnings():  # without a process group, one process is what dpokit means
            warnings.filterwarnings("ignore", SINGLE_PROCESS_WARNING, UserWarning)
            if asynchronous:
                return PendingCheckpoint(
                    final, dcp.async_save(shards, checkpoint_id=str(tmp / SHARDS), process_group=write_group), finish
                )
            dcp.save(shards, checkpoint_id=str(tmp / SHARDS))
    except (OSError, RuntimeError, CheckpointException) as exc:
        finish(failed=exc)
    return PendingCheckpoint(final, None, finish)


def _saving(final: Path, write):
    """`write`, with a failure to write turned into one error that names the last checkpoint to resume from."""

    def run():
        try:
            return write()
        except (OSError, RuntimeError) as exc:
            raise _cannot_write(final, final.parent.parent, exc) from exc

    return run


def _cannot_write(final: Path, run_dir: Path, exc: BaseException) -> DpokitError:
    previous = latest_checkpoint(run_dir)
    return DpokitError(
        f"cannot write checkpoint {final} ({_write_failure(exc)}); free space or fix the directory, then resume from "
        f"{previous or 'the start (no checkpoint yet)'} with --resume"
    )


def _write_failure(exc: BaseException) -> str:
    """The cause of a failed checkpoint write in a few words: the file-system error DCP wrapped (each rank's
    failure is an ``(exception, traceback)`` pair), not the text of its tracebacks."""
    failures = exc.failures.values() if isinstance(exc, CheckpointException) else [(exc, None)]
    for failure in failures:
        inner = failure[0] if isinstance(failure, tuple) else failure
        while inner is not None and not isinstance(inner, OSError):
            inner = inner.__cause__ or inner.__context__
        if isinstance(inner, OSError) and inner.errno is not None:
            where = f" on {inner.filename}" if inner.filename else ""
            return f"{inner.strerror or os.strerror(inner.errno)}{where}"
    return str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__


def check_finite_weights(model, step: int, device: torch.device) -> None:
    """Refuse to save non-finite trainable weights (every rank checks its shard; all agree)."""
    finite = [
        torch.isfinite(p.detach().to_local() if hasattr(p, "to_local") else p.detach()).all()
        for p in model.parameters()
        if p.requires_grad
    ]
    bad = bool(finite) and not bool(torch.stack(finite).all())  # one device sync, not one per tensor
    if any_rank([bad], device)[0]:
        raise DpokitError(
            f"step {step}: the weights are not finite; refusing to save them over the last good checkpoint"
        )


def save_pretrained(model: nn.Module, out_dir: Path, state_dict: dict[str, torch.Tensor], tokenizer=None) -> None:
    """A PEFT adapter directory (LoRA family) or an HF model directory (full), in safetensors."""
    model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)


def load_checkpoint_state(model: nn.Module, optimizer, checkpoint: Path, state: dict[str, Any], adapters: bool) -> None:
    """The trainable weights and the optimizer state of `checkpoint` into the (sharded) model and its optimizer;
    each rank reads the pieces of its own shards, at whatever process count the checkpoint was written."""
    template = sharded_state(model, optimizer, trainable_only=adapters)
    load_shards(template, Path(checkpoint) / SHARDS)
    options = StateDictOptions(ignore_frozen_params=adapters, strict=not adapters)
    set_model_state_dict(model, template["model"], options=options)
    if "optimizer" in template:
        set_optimizer_state_dict(model, optimizer, optim_state_dict=template["optimizer"], options=options)
    else:
        optimizer.load_state_dict(state["optimizer_in_backward"])


def rank_rng_state(state: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's saved RNG state: its own when the process count is unchanged, else rank 0's."""
    saved = state["rng"]
    return saved[rank] if len(saved) == world_size else saved[0]


def consolidate_checkpoint(checkpoint: Path, out_dir: Path) -> None:
    """Write `checkpoint`'s model in Hugging Face's format into `out_dir` (which must not exist) from its shards:
    the run's policy is built on CPU from its recorded config and the shards' weights loaded into it, in one
    process (DCP reshards). The optimizer state is not read."""
    from dpokit.config import TrainConfig, build_dataclass
    from dpokit.model import load_policy, uses_adapters

    checkpoint = Path(checkpoint)
    cfg = build_dataclass(
        TrainConfig, load_training_state(checkpoint)["config"], prefix="", source=str(checkpoint / STATE_FILE)
    )
    adapters = uses_adapters(cfg.model.method)
    model = load_policy(cfg.model, cfg.lora, torch.device("cpu"), adapter=cfg.reference.adapter)
    options = StateDictOptions(ignore_frozen_params=adapters, strict=not adapters)
    weights = {"model": get_model_state_dict(model, options=options)}
    load_shards(weights, checkpoint / SHARDS)
    set_model_state_dict(model, weights["model"], options=options)
    Path(out_dir).mkdir(parents=True)
    save_pretrained(model, Path(out_dir), full_model_state(model, trainable_only=adapters))


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
