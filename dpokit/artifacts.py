"""dpokit's own outputs: how they are recognised, when one may be replaced, and how it is replaced.

Every command that writes an output (``prepare``, ``ref-logps``, ``train``, ``export``,
``quickstart``, ``eject``, ``cache audit``, ``import``) goes through this module, so that nothing dpokit did not write is ever
deleted:

- `check_replaceable` runs before any work: an existing target is replaced only when it is
  recognisably dpokit's own artifact of that kind, the user passed ``--overwrite``/``--force``,
  and none of the command's inputs lies inside it.
- `replace_atomically` writes the new artifact to a temporary sibling (``.NAME.tmp-PID``) and
  renames it into place, so an interrupted command leaves the old artifact or the new one.

How an artifact is recognised (`is_dpokit_artifact`):

- a directory (``prepared``, ``export``, ``quickstart``, ``run``, ``audit``) holds the marker file
  ``.dpokit-artifact.json`` naming its kind, the dpokit version and the creation time.
- a reference cache (``cache``) is an HDF5 file whose root attributes include dpokit's
  ``format_version`` and ``data_fingerprint``.
- an ejected recipe or config (``ejected``) starts with the line ``# Ejected by dpokit ...``, a config
  converted by ``dpokit import`` (``imported``) with ``# Imported by dpokit ...``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from dpokit import __version__
from dpokit.errors import DpokitError
from dpokit.lock import process_alive

MARKER_NAME = ".dpokit-artifact.json"
EJECTED_PREFIX = "# Ejected by dpokit"
IMPORTED_PREFIX = "# Imported by dpokit"

# kind -> what the user calls it, as it reads in "it is not a ..."
DIRECTORY_KINDS = {
    "prepared": "`dpokit prepare` output",
    "export": "`dpokit export` output",
    "quickstart": "`dpokit quickstart` folder",
    "run": "dpokit training run directory",
    "audit": "`dpokit cache audit` output",
    "plots": "`dpokit plot` folder",
    "samples": "`dpokit sample` output",
    "scored": "`dpokit score` output",
    "iterate": "`dpokit iterate` folder",
}
FILE_KINDS = {
    "cache": "dpokit reference cache",
    "ejected": "file written by `dpokit eject`",
    "imported": "config written by `dpokit import`",
}
FIRST_LINES = {"ejected": EJECTED_PREFIX, "imported": IMPORTED_PREFIX}  # how a text file kind is told
CACHE_ATTRS = ("format_version", "data_fingerprint")  # root attributes every dpokit cache has


# ----------------------------------------------------------------------------------------------
# recognising dpokit's artifacts


def write_marker(directory: str | os.PathLike, kind: str, entries: Optional[Iterable[str]] = None) -> Path:
    """Mark `directory` as dpokit's artifact of `kind` (e.g. a run directory); returns the marker's path.

    `entries`: the names dpokit wrote at the directory's top level (a directory replaced whole records them,
    so that a later ``--overwrite`` can tell a file someone added from its own)."""
    _check_kind(kind, DIRECTORY_KINDS)
    marker = Path(directory) / MARKER_NAME
    record = {
        "kind": kind,
        "dpokit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if entries is not None:
        record["entries"] = sorted(entries)
    return _write_through_sibling(marker, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def read_marker(directory: str | os.PathLike) -> Optional[dict]:
    """The marker record of a dpokit directory artifact, or None if it has none (or an unreadable one)."""
    try:
        record = json.loads((Path(directory) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_dpokit_artifact(path: str | os.PathLike, kind: str) -> bool:
    """Whether `path` is an artifact of `kind` that dpokit wrote (see the module docstring for how it is told)."""
    return not_own_reason(Path(path), kind) is None


def not_own_reason(path: Path, kind: str) -> Optional[str]:
    """Why `path` is not dpokit's artifact of `kind` (e.g. "no .dpokit-artifact.json marker"), or None if it is."""
    if kind in DIRECTORY_KINDS:
        return _directory_reason(path, kind)
    _check_kind(kind, FILE_KINDS)
    if not path.is_file():
        return "it is not a file"
    return _cache_reason(path) if kind == "cache" else _first_line_reason(path, FIRST_LINES[kind])


def ejected_header(source: Path) -> str:
    """The first line `dpokit eject` writes above a copied file, by which ``--force`` recognises it later."""
    return f"{EJECTED_PREFIX} {__version__} from {source.name}; `dpokit eject --force` replaces this file\n"


def imported_header(source: Path) -> str:
    """The first line of a config `dpokit import` converted, by which ``--overwrite`` recognises it later."""
    return f"{IMPORTED_PREFIX} {__version__} from {source.name}; `dpokit import ... --overwrite` replaces this file\n"


def _check_kind(kind: str, kinds: dict[str, str]) -> None:
    if kind not in kinds:
        raise ValueError(f"unknown artifact kind {kind!r}; one of {', '.join([*DIRECTORY_KINDS, *FILE_KINDS])}")


def _directory_reason(path: Path, kind: str) -> Optional[str]:
    if path.is_symlink():
        return "it is a symbolic link"
    if not path.is_dir():
        return "it is not a directory"
    record = read_marker(path)
    if record is not None:
        found = record.get("kind")
        return None if found == kind else f"its {MARKER_NAME} marker says it is a dpokit {found!r}, not {kind!r}"
    return f"no {MARKER_NAME} marker"


def _cache_reason(path: Path) -> Optional[str]:
    import h5py

    if not h5py.is_hdf5(path):
        return "it is not an HDF5 file"
    try:
        with h5py.File(path, "r") as handle:
            attrs = set(handle.attrs)
    except OSError:
        return "it is not a readable HDF5 file"
    missing = [name for name in CACHE_ATTRS if name not in attrs]
    return f"its HDF5 root attributes lack {', '.join(missing)}" if missing else None


def _first_line_reason(path: Path, prefix: str) -> Optional[str]:
    with path.open("rb") as handle:
        first_line = handle.readline(len(prefix) + 1)
    return None if first_line.startswith(prefix.encode()) else f"its first line is not {prefix!r}"


# ----------------------------------------------------------------------------------------------
# checking a target before the work


def check_replaceable(
    target: str | os.PathLike,
    kind: str,
    overwrite: bool,
    inputs: Iterable[Optional[str | os.PathLike]] = (),
    flag: str = "--overwrite",
    option: str = "--out",
) -> None:
    """Raise `DpokitError` unless `target` may be written as a `kind` artifact; call it before any work.

    Fine: `target` is absent (or an empty directory). Refused: one of `inputs` (paths the command
    reads; names that are not local paths are skipped) is `target` or lies inside it; `target` is
    not dpokit's own artifact of `kind`; `target` is, but `overwrite` (the user's `flag`) is off.
    `option` is how the messages name the target to the user (``--out``, ``destination``).
    """
    target = Path(target)
    _restore_interrupted_swap(target)
    if not target.exists() and not target.is_symlink():
        return
    for source in inputs:
        if source is not None and _lies_within(Path(source), target):
            relation = "is" if Path(source).resolve() == target.resolve() else "contains"
            raise DpokitError(
                f"{option} {target} {relation} the input {source}; dpokit never replaces what a command reads: "
                f"choose another {option}"
            )
    if _is_empty_directory(target, kind):
        return
    reason = not_own_reason(target, kind)
    if reason is not None:
        raise DpokitError(refusal(target, kind, reason, option))
    if not overwrite:
        raise DpokitError(f"{target} already exists; pass {flag} to replace it, or choose another {option}")
    if target.is_dir():
        _refuse_foreign_entries(target, option)


def refusal(target: Path, kind: str, reason: str, option: str = "--out") -> str:
    """The one-line refusal to replace `target`, which is not dpokit's `kind` artifact for `reason`."""
    what = {**DIRECTORY_KINDS, **FILE_KINDS}[kind]
    return (
        f"refusing to replace {target}: it is not a {what} ({reason}); dpokit only replaces what it wrote: "
        f"choose another {option} or remove it yourself"
    )


def _lies_within(path: Path, directory: Path) -> bool:
    if not path.exists():
        return False
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def _is_empty_directory(path: Path, kind: str) -> bool:
    """An empty directory where a directory artifact goes: replacing it loses nothing."""
    return kind in DIRECTORY_KINDS and path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_room(target: str | os.PathLike, needed: int, option: str = "--out") -> None:
    """Refuse, before writing, a file of about `needed` bytes at `target` that the disk or this process's file-size
    limit (``ulimit -f``) cannot hold: a write that fails halfway can crash a native writer (HDF5) and leave
    its temporary file and lock behind."""
    import resource
    import shutil

    folder = Path(target).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DpokitError(
            f"{target} needs about {needed:,} bytes and {folder} has {free:,} free: free space or choose another {option}"
        )
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and needed > limit:
        raise DpokitError(
            f"{target} needs about {needed:,} bytes and this process may write files of at most {limit:,} (ulimit -f): "
            f"raise the limit or choose another {option}"
        )


# ----------------------------------------------------------------------------------------------
# replacing


def replace_atomically(target: str | os.PathLike, kind: str, write: Callable[[Path], object]) -> Path:
    """Write a `kind` artifact to `target` through a temporary sibling, so it is never half there.

    `write(tmp)` must create `tmp` (a directory for directory kinds, a file for file kinds); this
    then marks a directory and renames it into place. A directory swap renames the old artifact to
    ``.NAME.old-PID``, the new one in, then deletes the old: if the process dies between the two
    renames, the next `check_replaceable` or `replace_atomically` of that target puts the old one
    back. If `write` raises, the temporary sibling is removed and the old artifact is untouched.
    An existing `target` that is not dpokit's own artifact of `kind` is refused here too, whatever
    the caller checked before.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _restore_interrupted_swap(target)
    if (target.exists() or target.is_symlink()) and not _is_empty_directory(target, kind):
        reason = not_own_reason(target, kind)
        if reason is not None:
            raise DpokitError(refusal(target, kind, reason))
    if target.is_dir() and not _is_empty_directory(target, kind):
        _refuse_foreign_entries(target)
    mark = (
        (lambda tmp: write_marker(tmp, kind, [child.name for child in tmp.iterdir()]))
        if kind in DIRECTORY_KINDS
        else None
    )
    return _write_through_sibling(target, write, mark)


def foreign_entries(directory: Path) -> list[str]:
    """Top-level names in a dpokit directory that its marker does not list as written by dpokit (none when the
    marker lists nothing: a directory dpokit fills over time, such as a run)."""
    record = read_marker(directory) or {}
    written = record.get("entries")
    if not isinstance(written, list):
        return []
    return sorted(child.name for child in directory.iterdir() if child.name not in {*written, MARKER_NAME})


def _refuse_foreign_entries(target: Path, option: str = "--out") -> None:
    foreign = foreign_entries(target)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DpokitError(
            f"refusing to replace {target}: it holds {shown}, which dpokit did not write there, and replacing the "
            f"folder would delete it; move it out, or choose another {option}"
        )


def replace_within(
    artifact: str | os.PathLike, kind: str, target: str | os.PathLike, write: Callable[[Path], object]
) -> Path:
    """Write `target`, a file or directory inside dpokit's own `kind` artifact (a run's checkpoint,
    metrics or config), through a temporary sibling renamed into place: a reader sees the old version
    or the new one, never half of one. Refused when `artifact` is not dpokit's or `target` lies outside it."""
    target = Path(target)
    _check_within(Path(artifact), kind, [target], "write")
    _restore_interrupted_swap(target)
    return _write_through_sibling(target, write)


def write_text_within(artifact: str | os.PathLike, kind: str, target: str | os.PathLike, text: str) -> Path:
    """`replace_within` for a text file."""
    return replace_within(artifact, kind, target, lambda tmp: tmp.write_text(text))


def _write_through_sibling(
    target: Path, write: Callable[[Path], object], finish: Optional[Callable[[Path], object]] = None
) -> Path:
    """The one atomic-write mechanism: `write(tmp)` creates ``.NAME.tmp-PID`` next to `target`, `finish(tmp)`
    may add to it, then it is renamed over `target` (a directory is swapped: `_swap_directory`). If anything
    raises, the temporary is removed and `target` is as it was. Dead writers' temporaries are cleared first."""
    remove_stale_siblings(target)
    tmp = temporary_sibling(target, "tmp")
    try:
        write(tmp)
        if finish is not None:
            finish(tmp)
        _put_in_place(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    return target


def _put_in_place(tmp: Path, target: Path) -> None:
    if tmp.is_dir():
        _swap_directory(tmp, target)
    else:
        os.replace(tmp, target)


def begin_within(artifact: str | os.PathLike, kind: str, target: str | os.PathLike) -> Path:
    """`replace_within` in two halves, for a temporary filled over several calls or by several processes
    (a sharded checkpoint): the checks, then the temporary sibling's path (not yet created). Finish with
    `commit_within`, or `abort_within` on failure."""
    target = Path(target)
    _check_within(Path(artifact), kind, [target], "write")
    _restore_interrupted_swap(target)
    remove_stale_siblings(target)
    return temporary_sibling(target, "tmp")


def commit_within(tmp: Path, target: str | os.PathLike) -> Path:
    """Rename the filled temporary from `begin_within` over `target` (a directory is swapped whole)."""
    try:
        _put_in_place(Path(tmp), Path(target))
    except BaseException:
        _remove(Path(tmp))
        raise
    return Path(target)


def abort_within(tmp: Path) -> None:
    """Remove a temporary from `begin_within` that will not be committed."""
    _remove(Path(tmp))


def _check_within(artifact: Path, kind: str, paths: list[Path], action: str) -> None:
    """Refuse to `action` `paths` unless `artifact` is dpokit's own `kind` artifact and they lie inside it."""
    reason = not_own_reason(artifact, kind)
    if reason is not None:
        raise DpokitError(
            f"refusing to {action} inside {artifact}: {refusal(artifact, kind, reason).split(': ', 1)[1]}"
        )
    outside = [p for p in paths if artifact.resolve() not in p.resolve().parents]
    if outside:
        raise DpokitError(f"refusing to {action} {outside[0]}: it is not inside the dpokit {kind} {artifact}")


def remove_within(artifact: str | os.PathLike, kind: str, paths: Iterable[str | os.PathLike]) -> None:
    """Delete `paths` (files or directories, absent ones skipped) inside `artifact`, dpokit's own `kind`.

    For what dpokit wrote inside one of its artifacts and now replaces: a run's old checkpoints and
    metrics, a checkpoint's temporary directory. Refuses (deleting nothing) when `artifact` is not
    dpokit's `kind` artifact or a path lies outside it.
    """
    paths = [Path(p) for p in paths]
    _check_within(Path(artifact), kind, paths, "delete")
    for path in paths:
        _remove(path)


def temporary_sibling(target: Path, role: str) -> Path:
    """``.NAME.{role}-PID`` next to `target`: the only names `remove_stale_siblings` ever deletes."""
    return target.parent / f".{target.name}.{role}-{os.getpid()}"


def remove_stale_siblings(target: Path) -> list[Path]:
    """Delete the temporary siblings of `target` left by dpokit processes that died; returns what went.

    Only dpokit's own names are touched (``.NAME.tmp-PID``, ``.NAME.old-PID``), and only when PID is not a
    live process on this machine, so a concurrent writer keeps its own.
    """
    removed = []
    for sibling, _ in _dead_siblings(target):
        _remove(sibling)
        removed.append(sibling)
    return removed


def _dead_siblings(target: Path) -> Iterator[tuple[Path, str]]:
    """(path, "tmp" or "old") of each temporary sibling of `target` whose writing process is gone."""
    name = re.escape(target.name)
    pattern = re.compile(rf"\.{name}\.(?P<role>tmp|old)-(?P<pid>\d+)")
    for sibling in target.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match is not None and not _writer_alive(int(match["pid"])):
            yield sibling, match["role"]


def _swap_directory(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    old = temporary_sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    _remove(old)


def _restore_interrupted_swap(target: Path) -> None:
    """Put back an old artifact that a dead process had renamed away but not yet replaced."""
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return
    for sibling, role in _dead_siblings(target):
        if role == "old":
            os.rename(sibling, target)
            return


def _writer_alive(pid: int) -> bool:
    # This process is not writing that sibling now: it is a crashed run's that had our pid.
    return pid != os.getpid() and process_alive(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
