"""Fingerprints: SHA-256 digests that say what an artifact was made from.

- `weights_fingerprint` / `reference_fingerprint`: a model's (and adapter's) config and every weight byte;
  recorded in ``ref.h5`` and compared by ``train``.
- `tokenizer_fingerprint`: vocabulary, merges, special tokens and chat template; recorded by ``prepare``.
- `data_fingerprint`: the token ids (and a ranked split's scores) of every prepared split; recorded by ``prepare``,
  compared by the cache.
- `ends_sha256`: both ends of a file, so a truncated or damaged prepared file is found without reading it.
- `file_sha256`: every byte of a file (the samples a ``scored/`` folder was scored from).
- `numpy_view`: an Arrow integer (or float) array as a NumPy view of its buffer, how every reader of token ids gets them
  (pyarrow's own conversions import pandas).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from dpokit.errors import DpokitError

DIGEST_SPAN = 2**20  # bytes hashed at each end of a split file (the whole file when smaller)

CONFIG_FILES = ("config.json", "adapter_config.json")
# Keys of config.json that describe how a file was saved, not the model it holds.
CONFIG_KEYS_IGNORED = ("transformers_version", "_name_or_path")
READ_BLOCK = 16 << 20  # bytes read at a time when hashing a weight file


def weights_fingerprint(model_path: str | os.PathLike) -> str:
    """A SHA-256 identifying a model's (or adapter's) weights: any change to any weight changes it.

    Hashes the config (``config.json`` / ``adapter_config.json``, minus save-time keys) and every
    byte of every weight file as stored (safetensors, or pickled ``.bin`` when there are none), with
    its name and size. A 1 GB checkpoint takes about 0.5 s from the page cache, 0.9 s from disk
    (bench/fingerprint_results.md), 1.5% of the reference pass over 8 pairs on that CPU. The same
    weights saved differently (another dtype, sharding or safetensors metadata) get another
    fingerprint. `model_path` is a local directory or a hub name already in the local cache.
    """
    directory = resolve_model_dir(model_path)
    digest = hashlib.sha256()
    for name in CONFIG_FILES:
        if (directory / name).is_file():
            digest.update(name.encode())
            digest.update(_canonical_config(directory / name))
    weight_files = _weight_files(directory)
    if not weight_files:
        raise DpokitError(f"model {model_path}: no weight files (*.safetensors, pytorch_model*.bin) in {directory}")
    for path in weight_files:
        _hash_file(path, digest)
    return digest.hexdigest()


def reference_fingerprint(model_path: str | os.PathLike, adapter: Optional[str | os.PathLike] = None) -> str:
    """The fingerprint of a reference model: its weights, plus its adapter's if it has one."""
    weights = weights_fingerprint(model_path)
    if not adapter:
        return weights
    return combine_fingerprints(weights, weights_fingerprint(adapter))


def combine_fingerprints(weights: str, adapter: str) -> str:
    """The reference fingerprint of base weights with an adapter merged in."""
    return hashlib.sha256(f"{weights}+{adapter}".encode()).hexdigest()


def resolve_model_dir(model_path: str | os.PathLike) -> Path:
    """The local directory holding a model: the path itself, or a hub name's cached snapshot."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(model_path).startswith((".", "/", "~")):
        raise DpokitError(f"model {model_path}: not a directory; give a transformers model directory or a hub name")
    from huggingface_hub import snapshot_download

    try:
        directory = Path(snapshot_download(str(model_path), allow_patterns=["*.json", "*.safetensors"]))
        if not _weight_files(directory):  # an older repo with pickled weights only
            directory = Path(snapshot_download(str(model_path), allow_patterns=["*.json", "*.bin"]))
    except Exception as exc:
        raise DpokitError(f"model {model_path}: cannot find it locally or on the hub ({exc})") from exc
    return directory


def _weight_files(directory: Path) -> list[Path]:
    """The files transformers/peft load weights from: safetensors if any, else the pickled ``.bin`` ones.

    Other files in a checkpoint directory (``training_args.bin``, ``optimizer.pt``) are not weights.
    """
    safetensors = sorted(directory.glob("*.safetensors"))
    if safetensors:
        return safetensors
    return sorted([*directory.glob("pytorch_model*.bin"), *directory.glob("adapter_model.bin")])


def _canonical_config(path: Path) -> bytes:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DpokitError(f"{path}: not valid JSON ({exc})") from exc
    for key in CONFIG_KEYS_IGNORED:
        config.pop(key, None)
    return json.dumps(config, sort_keys=True).encode()


def _hash_file(path: Path, digest) -> None:
    """Feed a file's name, size and every byte to `digest`, reading `READ_BLOCK` bytes at a time."""
    digest.update(f"{path.name}|{path.stat().st_size}|".encode())
    buffer = bytearray(READ_BLOCK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while read := handle.readinto(buffer):
            digest.update(view[:read])


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 over vocabulary, merges, normalisation, special tokens and chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {
        "tokens": dict(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "chat_template": tokenizer.chat_template,
    }
    digest.update(json.dumps(specials, sort_keys=True).encode())
    return digest.hexdigest()


def data_fingerprint(splits: dict[str, Any], columns: Sequence[str]) -> str:
    """SHA-256 over the values of every split (names, offsets and values), in split-name order: the token ids,
    and a ranked split's scores (the pairing rule reads them).

    A split is a `datasets.Dataset`, or a function returning a fresh iterator over its Arrow record
    batches (`dpokit prepare` reads its split files back that way). Each column is hashed as one list
    array of all its rows: its offsets from 0 as int64 (a list of lists, ``completion_ids``, then the
    offsets of its inner lists the same way), then its values as int32 (floats, ``scores``, as float32).
    The bytes are fed a batch at a time (a pass per level of offsets, then one for the values), so a split
    larger than memory is hashed in one batch's worth of it.
    """
    digest = hashlib.sha256()
    for name in sorted(splits):
        batches = splits[name] if callable(splits[name]) else splits[name].data.to_batches
        digest.update(name.encode())
        for column in columns:
            digest.update(column.encode())
            first = next(_list_arrays(batches(), column), None)
            depth = _list_depth(first.type) if first is not None else 1
            for level in range(depth):
                digest.update(np.zeros(1, np.int64).tobytes())  # the first offset
                end = 0
                for lists in _list_arrays(batches(), column, level):
                    offsets = numpy_view(lists.offsets).astype(np.int64)
                    digest.update((offsets[1:] - offsets[0] + end).tobytes())
                    end += int(offsets[-1] - offsets[0])
            for values in _list_arrays(batches(), column, depth):
                values = numpy_view(values)
                digest.update(values.astype(np.float32 if values.dtype.kind == "f" else np.int32).tobytes())
    return digest.hexdigest()


def numpy_view(array) -> np.ndarray:
    """An Arrow integer or float array without nulls as a NumPy view of its data buffer (no copy). pyarrow's own
    conversions (``to_numpy``, ``np.asarray``) import pandas, 64 MiB of a training process's memory.
    A chunked array gives its chunks' values one after the other."""
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        views = [numpy_view(chunk) for chunk in array.chunks]
        return views[0] if len(views) == 1 else np.concatenate(views) if views else np.zeros(0, dtype=np.int64)
    kind = array.type
    if array.null_count or not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        return array.to_numpy(zero_copy_only=False)  # not dpokit's own columns: pyarrow's conversion
    if pa.types.is_floating(kind):  # a ranked split's scores
        dtype = np.dtype(f"f{kind.bit_width // 8}")
    else:
        dtype = np.dtype(f"{'i' if pa.types.is_signed_integer(kind) else 'u'}{kind.bit_width // 8}")
    return np.frombuffer(array.buffers()[1], dtype=dtype)[array.offset : array.offset + len(array)]


def _list_arrays(batches, column: str, level: int = 0):
    """The list arrays of `column` in record batches (or tables, whose columns are chunked), flattened `level`
    times (level 1: the inner lists of a list of lists, or the values of a list)."""
    for batch in batches:
        values = batch.column(column)
        for chunk in getattr(values, "chunks", [values]):
            for _ in range(level):
                chunk = chunk.flatten()
            yield chunk


def _list_depth(kind) -> int:
    """How many levels of lists an Arrow type has (``list<list<int32>>``: 2)."""
    depth = 0
    while hasattr(kind, "value_type"):
        kind, depth = kind.value_type, depth + 1
    return depth


def ends_sha256(file: Path) -> str:
    """SHA-256 of the first and last `DIGEST_SPAN` bytes of `file` (all of it when smaller than two spans)."""
    digest = hashlib.sha256()
    with open(file, "rb") as stream:
        digest.update(stream.read(DIGEST_SPAN))
        stream.seek(max(DIGEST_SPAN, file.stat().st_size - DIGEST_SPAN))
        digest.update(stream.read(DIGEST_SPAN))
    return digest.hexdigest()


def file_sha256(file: Path) -> str:
    """SHA-256 of every byte of `file`, read `READ_BLOCK` bytes at a time."""
    digest = hashlib.sha256()
    with open(file, "rb") as stream:
        while block := stream.read(READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()
