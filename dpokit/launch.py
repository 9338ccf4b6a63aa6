"""Running a training recipe: the built-in one or a user's file, in this process or N workers."""

from __future__ import annotations

import importlib.util
import sys
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Optional

from dpokit.config import TrainConfig, parse_recipe_args
from dpokit.errors import DpokitError
from dpokit.model import QUANTIZED_METHODS


def check_distributed_config(cfg: TrainConfig) -> None:
    """Refuse, before any worker starts, what multi-process training does not support (and a bad loss
    setting, which every worker would otherwise report once)."""
    from dpokit.losses import build_loss

    build_loss(cfg.loss)
    if cfg.model.method in QUANTIZED_METHODS:
        raise DpokitError(
            f"model.method={cfg.model.method} is not supported with more than one process: dpokit does not "
            "shard bitsandbytes 4-bit weights with FSDP2; run it on one process, or use model.method=lora "
            "(with distributed.cpu_offload=true to save memory)"
        )


def builtin_recipe_path() -> Path:
    """The shipped `recipes/dpo.py` (inside the installed package)."""
    return Path(str(resources.files("dpokit.recipes") / "dpo.py"))


def load_recipe_module(path: Path) -> ModuleType:
    """Import a recipe file as a module (it must define ``main(argv)``)."""
    path = Path(path)
    if not path.is_file():
        raise DpokitError(f"recipe {path} does not exist; `dpokit eject recipe` writes one")
    spec = importlib.util.spec_from_file_location(f"dpokit_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise DpokitError(f"recipe {path} has no main(argv) function")
    return module


def run_recipe(recipe: Optional[Path], argv: list[str], gpus: int = 1):
    """Run `recipe` (default: the built-in one) with `argv`; `gpus` > 1 launches that many workers."""
    path = Path(recipe) if recipe else builtin_recipe_path()
    if gpus > 1 and recipe is None:
        check_distributed_config(parse_recipe_args(argv))  # fail once, here, not once per worker
    if gpus > 1:
        from dpokit.distributed import launch_workers

        return launch_workers(gpus, [sys.executable, str(path), *argv])
    return load_recipe_module(path).main(argv)
