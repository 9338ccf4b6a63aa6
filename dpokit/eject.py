"""`dpokit eject`: copy the built-in training recipe, or a shipped config, out for customisation.

The ejected recipe is a plain script that imports only the installed ``dpokit`` library, so the
copy runs the same three ways as the original, with the same ``--config`` and overrides::

    dpokit train --recipe ./dpo_recipe.py --config tiny_lora data.path=prepared ...
    python ./dpo_recipe.py --config tiny_lora data.path=prepared ...
    torchrun --nproc-per-node 2 ./dpo_recipe.py --config tiny_lora data.path=prepared ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from dpokit.artifacts import check_replaceable, ejected_header, replace_atomically
from dpokit.config import resolve_config_path
from dpokit.launch import builtin_recipe_path

DEFAULT_RECIPE_DEST = Path("dpo_recipe.py")


def eject_recipe(dest: Optional[Path] = None, force: bool = False) -> Path:
    """Copy the built-in recipe to `dest` (default ``./dpo_recipe.py``); returns the path written."""
    return copy_file(builtin_recipe_path(), Path(dest) if dest else DEFAULT_RECIPE_DEST, force)


def eject_config(name: str, dest: Optional[Path] = None, force: bool = False) -> Path:
    """Copy the shipped config `name` to `dest` (default ``./NAME.yaml``); returns the path written."""
    source = resolve_config_path(name)
    return copy_file(source, Path(dest) if dest else Path(source.name), force)


def copy_file(source: Path, dest: Path, force: bool) -> Path:
    """Copy `source` to `dest` (a file, or a folder to put it in) under an ``# Ejected by dpokit`` line.

    That first line is how a later ``--force`` knows the file is an earlier eject: an existing
    `dest` without it (a file of the user's) is never replaced.
    """
    if dest.is_dir():
        dest = dest / source.name
    check_replaceable(dest, "ejected", force, inputs=(source,), flag="--force", option="destination")
    content = ejected_header(source).encode() + source.read_bytes()
    return replace_atomically(dest, "ejected", lambda tmp: tmp.write_bytes(content))
