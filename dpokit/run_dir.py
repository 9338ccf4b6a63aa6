"""What a training run directory is, and whether a resume keeps the run's meaning.

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` (and TensorBoard logs and
plots); `RUN_LOCK` makes one process its only writer. ``--resume`` compares the new config with the
one the checkpoint was saved with: a change to what the run computes (data, model, loss, batch,
optimizer, schedule) is refused unless ``output.allow_config_change=true``; settings that only change
how it runs (logging, saving, layout, memory options, the number of processes) may change freely.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from dpokit.artifacts import is_dpokit_artifact
from dpokit.errors import DpokitError

RUN_LOCK = ".dpokit.lock"

# Dotted prefixes of the keys that define what a run computes.
MEANING_KEYS = (
    "model.path", "model.tokenizer", "model.method", "model.dtype", "model.precision", "model.disable_dropout",
    "lora.", "data.path", "data.shuffle", "data.group_by_length", "reference.", "loss.", "optimizer.",
    "scheduler.", "training.max_steps", "training.epochs", "training.seed", "training.max_grad_norm",
)


def is_run_dir(path: Path) -> bool:
    """True for a directory `dpokit train` wrote: its marker (`dpokit.artifacts`), or for runs made before
    markers existed, its ``config.yaml`` with ``metrics.jsonl`` or ``checkpoints/``."""
    path = Path(path)
    if is_dpokit_artifact(path, "run"):
        return True
    return (path / "config.yaml").is_file() and ((path / "metrics.jsonl").exists() or (path / "checkpoints").is_dir())


def flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each meaning-defining key that differs (a key only one side has counts)."""
    old, new = dict(flatten(saved)), dict(flatten(now))
    changes = []
    for key in sorted(set(old) | set(new)):
        if key.startswith(MEANING_KEYS) and old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def global_batch(config: dict[str, Any], world_size: int) -> int:
    return int(config["data"]["batch_size"]) * int(config["training"]["gradient_accumulation_steps"]) * world_size


def check_resume_config(state: dict[str, Any], cfg, world_size: int, checkpoint: Path, announce=print) -> list[str]:
    """Refuse a resume that changes the run's meaning (see the module docstring); returns the changes."""
    from dpokit.config import config_to_dict

    saved = state.get("config")
    if not saved:
        return []
    now = config_to_dict(cfg)
    changes = config_changes(saved, now)
    saved_world = int(state.get("world_size", world_size))
    before, after = global_batch(saved, saved_world), global_batch(now, world_size)
    if before != after:
        changes.append(
            f"global batch (data.batch_size x training.gradient_accumulation_steps x processes): {before} -> {after}"
        )
    if changes and not cfg.output.allow_config_change:
        raise DpokitError(
            f"--resume from {checkpoint} with a different run: {'; '.join(changes[:6])}"
            f"{' ...' if len(changes) > 6 else ''}. Resume with the saved settings, start a new run (another --out), "
            "or pass --allow-config-change to continue with these"
        )
    if changes:
        announce(f"note: resuming with changed settings (allowed): {'; '.join(changes)}")
    return changes
