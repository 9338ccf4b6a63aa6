"""Reading a checkpoint's DCP shards without running any code a checkpoint file could carry.

`torch.distributed.checkpoint` reads a checkpoint's ``.metadata`` with ``pickle.load`` and its non-tensor
values (learning rates, step counts) with ``torch.load(weights_only=False)``: a checkpoint someone shared
could run a command on ``--resume`` or ``dpokit export``. `load_shards` reads the metadata with an unpickler
that builds only what DCP's own metadata holds (its dataclasses and enums, ``torch.Size``, dtypes, layouts,
paths) and the non-tensor values with ``weights_only=True``; anything else stops the load with one line.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from dpokit.errors import DpokitError

# What DCP warns on every save and load without a process group: one process is what dpokit means then.
SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"

_DCP_MODULES = ("torch.distributed.checkpoint.",)  # DCP's metadata classes live here
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout from its name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class UnsafeCheckpoint(DpokitError):
    """A checkpoint file refers to something a checkpoint never holds (it could run code)."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        if module.startswith(_DCP_MODULES):
            found = super().find_class(module, name)
            if isinstance(found, type):  # a dataclass or an enum, never a function
                return found
        raise UnsafeCheckpoint(
            f"checkpoint {self.path.parent.parent}: {self.path.name} refers to {module}.{name}, which a checkpoint's "
            "metadata never holds (loading it could run code); not loading it. Use a checkpoint you or dpokit wrote"
        )


def read_metadata(path: Path):
    """A DCP metadata file, through the unpickler that builds only what such a file holds."""
    with Path(path).open("rb") as stream:
        return _MetadataUnpickler(stream, Path(path)).load()


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        metadata = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # DCP's own helper, as its planner uses

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def load_shards(state_dict: dict[str, Any], shards: Path) -> None:
    """`dcp.load` of `shards` into `state_dict` (in place, resharded to this process group), executing nothing
    the files carry; a file that tries stops the load with `UnsafeCheckpoint`."""
    # DCP turns a failed metadata read into the text of an AssertionError: check first, so that a file carrying
    # code is refused as `UnsafeCheckpoint` (DCP then reads it again through the same unpickler).
    for path in sorted(Path(shards).glob("*.metadata")):  # ".metadata" and any per-rank "__N.metadata"
        read_metadata(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", SINGLE_PROCESS_WARNING, UserWarning)
            dcp.load(state_dict, storage_reader=_SafeReader(str(shards)), planner=_SafePlanner())
    except CheckpointException as exc:
        for failure in exc.failures.values():  # rank -> (exception, traceback)
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, DpokitError):
                raise inner from exc
        raise


def shard_damage(shards: Path) -> Optional[str]:
    """Why a checkpoint's shards cannot be loaded (no ``.metadata``, one that does not read, a shard file missing
    or shorter than the metadata says), or None when every piece the metadata names is there."""
    metadata_path = Path(shards) / ".metadata"
    if not metadata_path.is_file():
        return f"{metadata_path} is missing"
    try:
        metadata = read_metadata(metadata_path)
    except UnsafeCheckpoint:
        raise
    except Exception as exc:  # truncated or corrupted pickle
        return f"{metadata_path} does not read ({type(exc).__name__}: {exc})"
    ends: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = getattr(info, "relative_path", None)
        if name is not None:
            ends[name] = max(ends.get(name, 0), int(info.offset) + int(info.length))
    for name, end in sorted(ends.items()):
        path = Path(shards) / name
        if not path.is_file():
            return f"shard {path} is missing"
        if path.stat().st_size < end:
            return f"shard {path} is {path.stat().st_size} bytes, shorter than the {end} its metadata names"
    return None
