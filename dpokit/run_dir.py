"""What a training run directory is, and whether a resume keeps the run's meaning.

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` (and TensorBoard logs and
plots); `RUN_LOCK` makes one process its only writer. ``--resume`` compares the new config with the
one the checkpoint was saved with: a change to what the run computes (data, model, loss, batch,
optimizer, schedule) is refused unless ``output.allow_config_change=true``; settings that only change
how it runs (logging, saving, layout, memory options, the number of processes; each declared with
``meaning=False`` in `dpokit.config`) may change freely.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from dpokit.artifacts import is_dpokit_artifact, remove_within
from dpokit.config import changes_meaning, flatten
from dpokit.errors import DpokitError
from dpokit.trackers import TRACKERS_FILE

RUN_LOCK = ".dpokit.lock"
STOPPED_FILE = "stopped.json"  # a run stopped by a signal with a checkpoint: step, checkpoint, resume command


def resume_command(config: Path, world_size: int) -> str:
    """The command that resumes this run, launched as it was: one process, ``dpokit train --gpus N`` (its
    workers carry ``DPOKIT_LAUNCHER``), or torchrun on one or several nodes."""
    from dpokit.distributed import LAUNCHER_ENV

    if world_size == 1:
        return f"dpokit train --config {config} --resume"
    if os.environ.get(LAUNCHER_ENV) == "gpus":
        return f"dpokit train --config {config} --resume --gpus {world_size}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    nodes = max(1, world_size // per_node)
    where = " (on every node, with the same rendezvous options)" if nodes > 1 else ""
    return f"torchrun --nnodes {nodes} --nproc-per-node {per_node} -m dpokit train --config {config} --resume{where}"


def start_or_resume(run_dir: Path, output, announce=print) -> Optional[Path]:
    """The checkpoint a ``--resume`` continues from, or None for a fresh run in `run_dir`.

    A fresh run goes only into a new or empty directory or a dpokit run directory, and into one that
    already has a run only with ``--overwrite``. Nothing is removed here: the old run's files go only
    when the new run's setup has passed every check (`clear_old_run`), so a refused run leaves it whole.
    """
    from dpokit.checkpoint import latest_checkpoint, newest_intact_checkpoint

    has_run = (run_dir / "metrics.jsonl").exists()
    if output.resume:  # a damaged newest checkpoint (a cut or flipped file) is skipped, with a note
        checkpoint = newest_intact_checkpoint(run_dir, announce)
        if checkpoint is None:
            advice = (
                "it stopped before its first checkpoint: pass --overwrite to start it again"
                if has_run
                else "start it without --resume"
            )
            raise DpokitError(f"output.resume=true but {run_dir} has no complete checkpoint to resume from; {advice}")
        return checkpoint
    others = [p for p in run_dir.iterdir() if p.name != RUN_LOCK] if run_dir.is_dir() else []
    if others and not is_dpokit_artifact(run_dir, "run"):
        raise DpokitError(
            f"--out {run_dir} is a non-empty directory that is not a dpokit run; dpokit writes runs only into "
            "a new or empty directory or its own run directory: choose another --out"
        )
    if has_run and not output.overwrite:
        resumable = latest_checkpoint(run_dir) is not None
        raise DpokitError(
            f"run directory {run_dir} already has a run; "
            + (
                "pass --resume to continue it, --overwrite to start again, or another --out"
                if resumable
                else "it has no checkpoint to resume from: pass --overwrite to start again, or another --out"
            )
        )
    return None


def clear_stop_marker(run_dir: Path) -> None:
    """A run that starts or resumes is no longer stopped: remove `STOPPED_FILE` (a requeue rule tests for it)."""
    if (run_dir / STOPPED_FILE).exists():
        remove_within(run_dir, "run", [run_dir / STOPPED_FILE])


def clear_old_run(run_dir: Path) -> None:
    """Before a fresh ``--overwrite`` run writes its first file: remove the old run's own files
    (``metrics.jsonl``, ``samples.jsonl``, ``config.yaml``, the trackers file, ``checkpoints/step_*``) and
    nothing else. Called once setup has passed every check (cache, model, start-up check)."""
    from dpokit.checkpoint import list_checkpoints

    if not is_dpokit_artifact(run_dir, "run"):
        return  # an absent or empty --out has no old run
    old = [
        run_dir / "metrics.jsonl",
        run_dir / "samples.jsonl",
        run_dir / "config.yaml",
        run_dir / TRACKERS_FILE,
        run_dir / STOPPED_FILE,
        *(path for _, path in list_checkpoints(run_dir)),
    ]
    remove_within(run_dir, "run", old)


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each key that differs and defines the run (`dpokit.config.changes_meaning`:
    every key but those declared free to change, so a key this dpokit does not know counts)."""
    old, new = dict(flatten(saved)), dict(flatten(now))
    changes = []
    for key in sorted(set(old) | set(new)):
        if changes_meaning(key) and old.get(key) != new.get(key):
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
        announce(f"resuming with changed settings (allowed): {'; '.join(changes)}")
    return changes
