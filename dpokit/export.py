"""`dpokit export`: a run's latest checkpoint as a standalone model directory.

The export is written to a temporary sibling of ``--out`` and renamed into place
(`dpokit.artifacts`); an existing ``--out`` is replaced only with ``--overwrite`` and only if an
earlier export wrote it, and never when it holds the run being exported or the base model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import yaml

from dpokit.artifacts import check_replaceable, replace_atomically
from dpokit.checkpoint import DIGESTS_FILE, SHARDS, STATE_FILE, consolidate_checkpoint, export_merged, latest_checkpoint
from dpokit.errors import DpokitError


def resolve_checkpoint(run_or_checkpoint: Path) -> Path:
    path = Path(run_or_checkpoint)
    if (path / STATE_FILE).is_file():
        return path
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise DpokitError(f"{path} is neither a checkpoint nor a run directory with checkpoints")
    return checkpoint


def export_run(
    run_or_checkpoint: Path,
    out: Path,
    merge: bool = True,
    base_model: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Merge a LoRA-family adapter into its base (or copy a full model, consolidating it from the checkpoint's
    shards when it was saved before the run's end) into `out`, without training state."""
    checkpoint = resolve_checkpoint(run_or_checkpoint)
    is_adapter = (checkpoint / "adapter_config.json").is_file()
    if is_adapter and merge and base_model is None:
        config_file = checkpoint.parent.parent / "config.yaml"
        if not config_file.is_file():
            raise DpokitError(f"cannot tell the base model of {checkpoint}; pass --base-model")
        base_model = yaml.safe_load(config_file.read_text())["model"]["path"]
    check_replaceable(out, "export", overwrite, inputs=(run_or_checkpoint, checkpoint, base_model))
    if is_adapter and merge:
        from dpokit.model import check_model_path

        check_model_path(str(base_model))  # before any work: a missing folder is one line, not a hub lookup

    def write(tmp: Path) -> None:
        if is_adapter and merge:
            export_merged(checkpoint, base_model, tmp)
        elif (
            not is_adapter and not (checkpoint / "config.json").is_file()
        ):  # an intermediate full checkpoint: shards only
            consolidate_checkpoint(checkpoint, tmp)
        else:
            shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns(STATE_FILE, SHARDS, DIGESTS_FILE))

    return replace_atomically(out, "export", write)
