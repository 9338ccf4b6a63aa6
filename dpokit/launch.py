"""Running a training recipe: the built-in one or a user's file, in this process or N workers."""

from __future__ import annotations

import importlib.util
import sys
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Optional

from dpokit import log
from dpokit.config import parse_recipe_args, uses_bitsandbytes
from dpokit.errors import DpokitError


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


def run_recipe(recipe: Optional[Path], argv: list[str], gpus: int = 1, own_process: bool = False):
    """Run `recipe` (default: the built-in one) with `argv`; `gpus` > 1 launches that many workers.

    Args:
        own_process: this process runs this one command and exits (the `dpokit` command, not a program that
            imports dpokit): a run whose config needs no bitsandbytes then keeps it out of the process.
    """
    path = Path(recipe) if recipe else builtin_recipe_path()
    log.debug(f"recipe {path} in {gpus} process{'es' if gpus > 1 else ''}: {' '.join(argv)}")
    if gpus > 1 and recipe is None:
        parse_recipe_args(argv, world_size=gpus)  # a bad config fails once, here, not once per worker
    if gpus > 1:
        from dpokit.distributed import launch_workers

        return launch_workers(gpus, [sys.executable, str(path), *argv])
    if own_process and not uses_bitsandbytes(parse_recipe_args(argv)):
        from dpokit.model import block_bitsandbytes_import  # no 1 s import, no `kernels` warning for LoRA or full

        block_bitsandbytes_import()
    return load_recipe_module(path).main(argv)
