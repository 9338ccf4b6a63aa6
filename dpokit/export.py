"""`dpokit export`: a run's latest checkpoint as a standalone model directory."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import yaml

from dpokit.checkpoint import STATE_FILE, export_merged, latest_checkpoint
from dpokit.errors import DpokitError


def resolve_checkpoint(run_or_checkpoint: Path) -> Path:
    path = Path(run_or_checkpoint)
    if (path / STATE_FILE).is_file():
        return path
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise DpokitError(f"{path} is neither a checkpoint nor a run directory with checkpoints")
    return checkpoint


def export_run(run_or_checkpoint: Path, out: Path, merge: bool = True, base_model: Optional[str] = None) -> Path:
    """Merge a LoRA-family adapter into its base (or copy a full model) into `out`, without training state."""
    checkpoint = resolve_checkpoint(run_or_checkpoint)
    is_adapter = (checkpoint / "adapter_config.json").is_file()
    if is_adapter and merge:
        if base_model is None:
            config_file = checkpoint.parent.parent / "config.yaml"
            if not config_file.is_file():
                raise DpokitError(f"cannot tell the base model of {checkpoint}; pass --base-model")
            base_model = yaml.safe_load(config_file.read_text())["model"]["path"]
        return export_merged(checkpoint, base_model, out)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(checkpoint, out, ignore=shutil.ignore_patterns(STATE_FILE))
    return out
