"""The on-disk format of `dpokit prepare`: one Arrow dataset per split plus ``manifest.json``.

Layout::

    prepared/
      manifest.json       source, counts, tokenizer fingerprint, lengths, data fingerprint
      train/              datasets.Dataset.save_to_disk; columns prompt_ids, chosen_ids, rejected_ids
      eval/               (optional) the same

``chosen_ids``/``rejected_ids`` hold the completion tokens only (the end-of-turn token included);
the full sequences are ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids``. Row ``i`` of a
split is example ``i`` in the reference cache and in training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpokit.errors import DpokitError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass
class PreparedData:
    """A loaded ``prepared/`` directory."""

    path: Path
    manifest: dict[str, Any]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["data_fingerprint"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    def split(self, name: str):
        """The `datasets.Dataset` of split `name` (memory-mapped Arrow)."""
        import datasets

        if name not in self.manifest["splits"]:
            raise DpokitError(
                f"{self.path}: no split {name!r}; it has {', '.join(self.splits)} "
                f"(re-run `dpokit prepare` with --eval-fraction or --eval-data for an eval split)"
            )
        return datasets.load_from_disk(str(self.path / name))


def load_prepared(path: str | os.PathLike) -> PreparedData:
    """Open a `dpokit prepare` output directory, checking that it is complete."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise DpokitError(f"prepared data {path} does not exist; create it with `dpokit prepare DATA --out {path}`")
    if not manifest_path.is_file():
        raise DpokitError(
            f"{path} has no {MANIFEST_NAME}: it is not a complete `dpokit prepare` output; prepare it again"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise DpokitError(f"{manifest_path}: not valid JSON ({exc}); prepare the data again") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DpokitError(
            f"{path}: prepared format version {version} is not supported (this dpokit reads {FORMAT_VERSION}); "
            "prepare the data again with this version"
        )
    for split in manifest.get("splits", {}):
        if not (path / split).is_dir():
            raise DpokitError(f"{path}: split {split!r} is listed in the manifest but missing on disk")
    return PreparedData(path=path, manifest=manifest)


def data_fingerprint(splits: dict[str, Any]) -> str:
    """SHA-256 over the token ids of every split (names, offsets and values), in split-name order."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        table = splits[name].data
        digest.update(name.encode())
        for column in COLUMNS:
            array = table.column(column).combine_chunks()
            digest.update(column.encode())
            digest.update(np.asarray(array.offsets).astype(np.int64).tobytes())
            digest.update(np.asarray(array.values).astype(np.int32).tobytes())
    return digest.hexdigest()


def write_prepared(out_dir: str | os.PathLike, splits: dict[str, Any], manifest: dict[str, Any], overwrite: bool) -> Path:
    """Write splits and manifest to a temporary sibling directory, then rename it into place.

    An interrupted run leaves only ``.{name}.tmp-*``, never a directory that `load_prepared` accepts.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DpokitError(f"output directory {out_dir} already exists; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by an interrupted earlier run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    for name, dataset in splits.items():
        dataset.save_to_disk(str(tmp / name))
    manifest = dict(manifest, format_version=FORMAT_VERSION, data_fingerprint=data_fingerprint(splits))
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def pair_token_counts(split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token counts ``[N]`` (int64) of each pair's prompt, chosen and rejected, read from Arrow offsets."""
    import pyarrow.compute as pc

    arrow = split.with_format("arrow")
    return tuple(
        pc.list_value_length(arrow[name]).to_numpy(zero_copy_only=False).astype(np.int64) for name in COLUMNS
    )
