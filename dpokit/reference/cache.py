"""The reference cache (``ref.h5``): the frozen reference model's log-probs, one row per example.

Layout (docs/cache-format.md has the full schema and an h5py snippet)::

    /{split}/chosen_logps     float32 [N]   sum of log p over the chosen completion tokens
    /{split}/rejected_logps   float32 [N]
    /{split}/chosen_tokens    int32   [N]   completion token counts
    /{split}/rejected_tokens  int32   [N]
    /{split}/done             bool    [N]   rows written; a resumed run fills only the others
    /{split}/token_offsets    int64   [N+1] with --per-token: row i's tokens are token_logps[offsets[i]:offsets[i+1]],
    /{split}/token_logps      float32 [T]   its chosen completion's tokens, then its rejected completion's

A cache of ranked data (``shape`` attribute ``ranked``; prepared groups of k completions) has one row per
completion instead, each group's completions consecutive::

    /{split}/completion_logps   float32 [C]   sum of log p over the completion's tokens
    /{split}/completion_tokens  int32   [C]
    /{split}/group_offsets      int64   [N+1] group i's completions are rows group_offsets[i]:group_offsets[i+1]
    /{split}/done, /{split}/row_crc        [C]   per completion row; a group is written in one commit
    /{split}/token_offsets, token_logps          with --per-token, per completion row

Root attributes name what the rows were computed from (data, tokenizer and reference fingerprints,
compute dtype), so a reader can refuse a cache that belongs to other data or another model.

Crash safety. The file is created whole (every split, every dataset, allocated and filled) in a
temporary file that is renamed into place, so its structure is final before any row is computed.
Rows are then committed in small transactions that open the file, write values, flush, set
``done``, and close it again: the file is open only for the milliseconds of a commit, and a commit
only overwrites bytes inside datasets that already exist (contiguous, pre-allocated storage, no
metadata change). A process killed at any moment leaves a readable file whose ``done`` rows are
exactly the rows whose values reached it. The format is pinned to the HDF5 1.8 file format: newer
superblocks record "open for writing" in the file, and a killed writer leaves such a file
unreadable until ``h5clear`` is run on it.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence

import numpy as np

from dpokit import __version__
from dpokit.artifacts import check_replaceable, check_room, replace_atomically
from dpokit.errors import DpokitError
from dpokit.fingerprint import combine_fingerprints
from dpokit.lock import WriterLock, lock_path

if TYPE_CHECKING:
    import torch

    from dpokit.types import ChosenRejectedOutputs

# torch is imported where tensors are made (`RefCache.logps`), so `dpokit cache info` starts in well under a second.

FORMAT_VERSION = 1
LIBVER = ("earliest", "v108")  # never a v3 superblock: see the module docstring
ROW_DATASETS = {
    "chosen_logps": np.float32,
    "rejected_logps": np.float32,
    "chosen_tokens": np.int32,
    "rejected_tokens": np.int32,
}
RANKED_DATASETS = {"completion_logps": np.float32, "completion_tokens": np.int32}  # a ranked cache's rows
GROUP_OFFSETS = "group_offsets"
DONE = "done"
ROW_CRC = "row_crc"  # CRC-32 of each written row's values (and its per-token values), checked when read
TOKEN_LOGPS, TOKEN_OFFSETS = "token_logps", "token_offsets"  # the optional per-token layout (``per_token``)

# Attributes that say what the rows were computed from; a rerun or a reader compares them.
IDENTITY_ATTRS = {
    "format_version": "the cache format version",
    "data_fingerprint": "the prepared data",
    "tokenizer_fingerprint": "the tokenizer",
    "weights_fingerprint": "the reference model's weights",
    "adapter_fingerprint": "the reference adapter",
    "reference_fingerprint": "the reference model (weights and adapter)",
    "dtype": "the compute dtype",
    "attn_implementation": "the attention implementation",
    "per_token": "per-token log-probs (--per-token)",
}


# ----------------------------------------------------------------------------------------------
# reading


class CachedLogps(NamedTuple):
    """One split's reference outputs, indexed by example: log-probs float32, token counts int64, and
    with a per-token cache each row's token log-probs (flat, with offsets)."""

    chosen_logps: torch.Tensor  # [N]
    rejected_logps: torch.Tensor  # [N]
    chosen_tokens: torch.Tensor  # [N]
    rejected_tokens: torch.Tensor  # [N]
    token_logps: Optional[torch.Tensor] = None  # [T] float32
    token_offsets: Optional[torch.Tensor] = None  # [N+1] int64

    def select(self, index: torch.Tensor) -> ChosenRejectedOutputs:
        """The reference outputs of the examples in `index` (e.g. ``PairBatch.index``)."""
        from dpokit.types import ChosenRejectedOutputs

        index = index.cpu()
        outputs = ChosenRejectedOutputs(
            chosen_logps=self.chosen_logps[index],
            rejected_logps=self.rejected_logps[index],
            chosen_tokens=self.chosen_tokens[index],
            rejected_tokens=self.rejected_tokens[index],
        )
        if self.token_logps is not None:
            chosen, chosen_mask, rejected, rejected_mask = self.select_tokens(index)
            outputs.chosen_token_logps, outputs.chosen_token_mask = chosen, chosen_mask
            outputs.rejected_token_logps, outputs.rejected_token_mask = rejected, rejected_mask
        return outputs

    def select_tokens(self, index: torch.Tensor):
        """Padded per-token log-probs of rows `index` (`split_token_values`)."""
        import torch

        from dpokit.types import split_token_values

        starts, chosen, rejected = self.token_offsets[index], self.chosen_tokens[index], self.rejected_tokens[index]
        b = index.numel()
        lengths = torch.cat([chosen, rejected])  # outputs 0..B-1 chosen, B..2B-1 rejected
        firsts = torch.cat([starts, starts + chosen])
        slots = torch.repeat_interleave(torch.arange(2 * b), lengths)
        positions = torch.arange(int(lengths.sum())) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths
        )
        values = self.token_logps[firsts[slots] + positions]
        return split_token_values(values, slots, b)


class CachedRankedLogps(NamedTuple):
    """One ranked split's reference outputs: per completion (group by group) its log-prob and token count, the
    groups' offsets into them, and with a per-token cache each completion's token log-probs (flat, with offsets)."""

    logps: torch.Tensor  # [C] float32
    tokens: torch.Tensor  # [C] int64
    group_offsets: torch.Tensor  # [N+1] int64
    token_logps: Optional[torch.Tensor] = None  # [T]
    token_offsets: Optional[torch.Tensor] = None  # [C+1]

    def select(self, index: torch.Tensor):
        """The `RankedOutputs` of the groups in `index` (e.g. ``PairBatch.index``), their completions in batch order."""
        import torch

        from dpokit.types import RankedOutputs, ranked_token_values

        index = index.cpu()
        starts, stops = self.group_offsets[index], self.group_offsets[index + 1]
        sizes = stops - starts
        rows = _ranges(starts, sizes)
        outputs = RankedOutputs(logps=self.logps[rows], group_sizes=tuple(sizes.tolist()), tokens=self.tokens[rows])
        if self.token_logps is not None:
            lengths = self.tokens[rows]
            values = self.token_logps[_ranges(self.token_offsets[rows], lengths)]
            slots = torch.repeat_interleave(torch.arange(rows.numel()), lengths)
            outputs.token_logps, outputs.token_mask = ranked_token_values(values, slots, rows.numel())
        return outputs


def _ranges(starts, lengths):
    """``cat(arange(s, s + n) for s, n in zip(starts, lengths))`` without a Python loop."""
    import torch

    total = int(lengths.sum())
    offsets = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths)
    return torch.arange(total) + offsets


@dataclass(frozen=True)
class RefCache:
    """A reference cache's attributes and per-split progress; `logps` reads a split's rows.

    The file is not held open: each read opens and closes it, so a cache being written can be
    inspected, and forked data-loader workers share no HDF5 handle.
    """

    path: Path
    attrs: dict[str, Any]
    rows: dict[str, int]  # split -> N examples (pairs, or ranked groups)
    rows_done: dict[str, int]  # split -> examples whose values are written (`done`)

    @property
    def is_ranked(self) -> bool:
        return self.attrs.get("shape") == "ranked"

    @property
    def splits(self) -> list[str]:
        return list(self.rows)

    def is_complete(self, split: str) -> bool:
        return self.rows_done.get(split) == self.rows.get(split)

    def rebuild_command(self, splits: Optional[Sequence[str]] = None) -> str:
        """The `dpokit ref-logps` command that rebuilds this file from the inputs it records."""
        command = (
            f"dpokit ref-logps {self.attrs.get('prepared', 'PREPARED')} --model {self.attrs.get('model', 'MODEL')}"
        )
        if self.attrs.get("adapter"):
            command += f" --adapter {self.attrs['adapter']}"
        command += f" --out {self.path}"
        if self.attrs.get("dtype"):
            command += f" --dtype {self.attrs['dtype']}"
        if self.attrs.get("attn_implementation"):
            command += f" --attn-implementation {self.attrs['attn_implementation']}"
        if self.attrs.get("per_token"):
            command += " --per-token"
        if splits:
            command += f" --splits {','.join(splits)}"
        return command

    def mismatches(self, expected: dict[str, Any]) -> list[str]:
        """One line per identity attribute whose value differs from `expected` (keys not given are skipped)."""
        lines = []
        for key, value in expected.items():
            if value is None:
                continue
            found = self.attrs[key]
            if found != value:
                lines.append(
                    f"{key} differs ({IDENTITY_ATTRS.get(key, key)}): {short_value(found)} in the file, {short_value(value)} now"
                )
        return lines

    def check_matches(
        self,
        data_fingerprint: Optional[str] = None,
        reference_fingerprint: Optional[str] = None,
        tokenizer_fingerprint: Optional[str] = None,
    ) -> None:
        """Raise `DpokitError` naming each fingerprint that differs and the command to rebuild the cache."""
        lines = self.mismatches(
            {
                "data_fingerprint": data_fingerprint,
                "reference_fingerprint": reference_fingerprint,
                "tokenizer_fingerprint": tokenizer_fingerprint,
            }
        )
        if lines:
            raise DpokitError(
                f"reference cache {self.path} was built from other inputs: {'; '.join(lines)}. "
                f"Rebuild it for these inputs: `dpokit ref-logps PREPARED --model MODEL [--adapter ADAPTER] "
                f"--out {self.path} --overwrite` (it was built with `{self.rebuild_command()}`)"
            )

    def logps(self, split: str, require_done: bool = True) -> CachedLogps | CachedRankedLogps:
        """A whole split's cached outputs (16 bytes per pair), after checking every row is done: `CachedLogps` for
        pairs, `CachedRankedLogps` for ranked groups.

        With ``require_done=False`` rows not yet written are returned too (log-probs NaN, counts 0).
        """
        if split not in self.rows:
            raise DpokitError(
                f"reference cache {self.path} has no split {split!r} (it has {', '.join(self.splits)}); "
                f"rebuild it from the prepared data that has it: `{self.rebuild_command()} --overwrite`"
            )
        names = row_datasets(self.is_ranked)
        with _open_h5(self.path, "r") as handle:
            group = handle[split]
            done = group[DONE][()]
            if require_done and not done.all():
                examples = f"{self.rows_done[split]}/{self.rows[split]}"
                raise DpokitError(
                    f"reference cache {self.path}: split {split!r} has {examples} rows done; "
                    f"finish it with `{self.rebuild_command([split])}` (it resumes where it stopped)"
                )
            arrays = {name: group[name][()] for name in names}
            per_token = TOKEN_LOGPS in group
            if per_token:
                arrays[TOKEN_LOGPS], arrays[TOKEN_OFFSETS] = group[TOKEN_LOGPS][()], group[TOKEN_OFFSETS][()]
            if ROW_CRC in group:  # a cache from before the checksums has none to check
                self._check_rows(split, arrays, group[ROW_CRC][()], done, per_token)
            offsets = group[GROUP_OFFSETS][()] if self.is_ranked else None
        import torch

        tokens = {
            TOKEN_LOGPS: torch.from_numpy(arrays[TOKEN_LOGPS]) if per_token else None,
            TOKEN_OFFSETS: torch.from_numpy(arrays[TOKEN_OFFSETS].astype(np.int64)) if per_token else None,
        }
        if self.is_ranked:
            return CachedRankedLogps(
                logps=torch.from_numpy(arrays["completion_logps"]),
                tokens=torch.from_numpy(arrays["completion_tokens"].astype(np.int64)),
                group_offsets=torch.from_numpy(offsets.astype(np.int64)),
                **tokens,
            )
        return CachedLogps(
            chosen_logps=torch.from_numpy(arrays["chosen_logps"]),
            rejected_logps=torch.from_numpy(arrays["rejected_logps"]),
            chosen_tokens=torch.from_numpy(arrays["chosen_tokens"].astype(np.int64)),
            rejected_tokens=torch.from_numpy(arrays["rejected_tokens"].astype(np.int64)),
            **tokens,
        )

    def _check_rows(
        self, split: str, arrays: dict[str, np.ndarray], recorded: np.ndarray, done: np.ndarray, per_token: bool
    ) -> None:
        """Raise naming the rows whose values differ from the CRC-32 written with them (a flipped bit on disk)."""
        rows = np.flatnonzero(done)
        columns = {name: arrays[name][rows] for name in row_datasets(self.is_ranked)}
        per_row = None
        if per_token:
            offsets, values = arrays[TOKEN_OFFSETS], arrays[TOKEN_LOGPS]
            per_row = [values[offsets[i] : offsets[i + 1]] for i in rows]
        bad = rows[row_checksums(columns, per_row) != recorded[rows]]
        if self.is_ranked:  # name the groups, as everything else does
            bad = np.unique(self.groups_of(split, bad))
        if bad.size:
            shown = ", ".join(str(int(i)) for i in bad[:5]) + (f" (and {bad.size - 5} more)" if bad.size > 5 else "")
            raise DpokitError(
                f"reference cache {self.path}: split {split!r} rows {shown} do not match the checksums written with "
                f"them (the file changed on disk); rebuild it with `{self.rebuild_command()} --overwrite`"
            )

    def done_mask(self, split: str) -> np.ndarray:
        """``done`` of a split's examples: True where the row (all of a ranked group's completions) is written."""
        with _open_h5(self.path, "r") as handle:
            group = handle[split]
            return _examples_done(group[DONE][()], group[GROUP_OFFSETS][()] if GROUP_OFFSETS in group else None)

    def pending_rows(self, split: str) -> np.ndarray:
        """Example indices of a split not yet written, ascending."""
        return np.flatnonzero(~self.done_mask(split))

    def group_offsets(self, split: str) -> np.ndarray:
        """A ranked split's ``[N+1]`` offsets of each group's completion rows."""
        with _open_h5(self.path, "r") as handle:
            return handle[split][GROUP_OFFSETS][()]

    def groups_of(self, split: str, completion_rows: np.ndarray) -> np.ndarray:
        """The group of each completion row of a ranked split."""
        return np.searchsorted(self.group_offsets(split), completion_rows, side="right") - 1


def row_datasets(ranked: bool) -> dict[str, Any]:
    """The per-row datasets of a cache: a pair's four values, or a ranked completion's two."""
    return RANKED_DATASETS if ranked else ROW_DATASETS


def _examples_done(done: np.ndarray, group_offsets: Optional[np.ndarray]) -> np.ndarray:
    """Per example: its row is done (pairs), or every row of its group is (ranked)."""
    if group_offsets is None:
        return done
    if len(group_offsets) < 2:
        return np.zeros(0, dtype=bool)
    return np.logical_and.reduceat(done, group_offsets[:-1]) if done.size else np.zeros(len(group_offsets) - 1, bool)


def open_cache(path: str | os.PathLike) -> RefCache:
    """Open a reference cache written by `dpokit ref-logps`, checking its format and layout."""
    path = Path(path)
    if not path.is_file():
        raise DpokitError(
            f"reference cache {path} does not exist; build it with `dpokit ref-logps PREPARED --model MODEL --out {path}`"
        )
    with _open_h5(path, "r") as handle:
        attrs = {key: _attr_value(value) for key, value in handle.attrs.items()}
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise DpokitError(
                f"{path}: reference cache format version {version} is not supported (this dpokit reads "
                f"{FORMAT_VERSION}); rebuild it with `dpokit ref-logps ... --out {path} --overwrite`"
            )
        missing = [key for key in IDENTITY_ATTRS if key not in attrs]
        if missing:
            raise DpokitError(
                f"{path}: the reference cache does not record {', '.join(missing)} (what its rows were computed "
                f"from); rebuild it with `dpokit ref-logps ... --out {path} --overwrite`"
            )
        rows, rows_done = {}, {}
        ranked = attrs.get("shape") == "ranked"
        for split in handle:
            group = handle[split]
            for name in (*row_datasets(ranked), DONE, *((GROUP_OFFSETS,) if ranked else ())):
                if name not in group:
                    raise DpokitError(f"{path}: /{split}/{name} is missing; rebuild the cache with --overwrite")
            done = _examples_done(group[DONE][()], group[GROUP_OFFSETS][()] if ranked else None)
            rows[split] = int(done.shape[0])
            rows_done[split] = int(np.count_nonzero(done))
    return RefCache(path=path, attrs=attrs, rows=rows, rows_done=rows_done)


def _open_h5(path: Path, mode: str):
    import h5py

    try:
        return h5py.File(path, mode, libver=LIBVER)
    except OSError as exc:
        if mode == "r":
            import h5py

            if path.is_file() and not h5py.is_hdf5(
                path
            ):  # another file given as the cache: never offer to overwrite it
                raise DpokitError(
                    f"{path} is not a reference cache (not an HDF5 file); give the file `dpokit ref-logps` wrote "
                    "(a cache damaged this far is not recognised as dpokit's: remove it yourself, then rebuild it)"
                ) from exc
            raise DpokitError(
                f"{path} is not a readable reference cache ({exc}); rebuild it with `dpokit ref-logps ... --out {path} --overwrite`"
            ) from exc
        raise DpokitError(f"cannot open {path} for writing ({exc}); is another `dpokit ref-logps` writing it?") from exc


def _attr_value(value: Any) -> Any:
    """HDF5 attributes as plain Python values (numpy scalars and bytes become int/float/str)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def short_value(value: Any) -> str:
    if value is None or value == "":
        return "none"
    text = str(value)
    return f"{text[:12]}…" if len(text) > 16 else text


# ----------------------------------------------------------------------------------------------
# writing


def cache_attrs(
    model: str,
    weights: str,
    adapter: Optional[str],
    adapter_weights: Optional[str],
    prepared_path: str,
    data_fingerprint: str,
    tokenizer_fingerprint: str,
    dtype: str,
    attn_implementation: str = "sdpa",
    per_token: bool = False,
    shape: str = "pairs",
) -> dict[str, Any]:
    """The root attributes of a new cache (HDF5 attributes cannot be None: absent is "")."""
    return {
        "format_version": FORMAT_VERSION,
        "dpokit_version": __version__,
        "model": model,
        "weights_fingerprint": weights,
        "adapter": adapter or "",
        "adapter_fingerprint": adapter_weights or "",
        "reference_fingerprint": combine_fingerprints(weights, adapter_weights) if adapter_weights else weights,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "data_fingerprint": data_fingerprint,
        "prepared": prepared_path,
        "dtype": dtype,
        "attn_implementation": attn_implementation,
        "per_token": bool(per_token),
        "shape": shape,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def create_or_resume_cache(
    path: str | os.PathLike,
    attrs: dict[str, Any],
    rows: dict[str, int],
    overwrite: bool,
    token_counts: Optional[dict[str, np.ndarray]] = None,
    group_sizes: Optional[dict[str, np.ndarray]] = None,
) -> RefCache:
    """The cache at `path` to fill: a new one, or the existing one if it was made from the same inputs.

    `rows` counts examples per split; for ranked data (``attrs["shape"] == "ranked"``) `group_sizes` gives each
    group's completions, and `token_counts` (a per-token cache) counts tokens per cache row: per pair (chosen
    and rejected together), or per completion.

    An existing file made from other data, tokenizer, model or dtype is refused with a message
    naming what differs, unless `overwrite`. A directory, or a file that is not a reference cache, is
    refused either way (`check_cache_target`).
    """
    path = Path(path)
    check_cache_target(path, overwrite)
    if path.exists() and not overwrite:
        existing = open_cache(path)
        # weights and adapter are compared one by one; their combination would only repeat them
        lines = existing.mismatches({key: attrs.get(key) for key in IDENTITY_ATTRS if key != "reference_fingerprint"})
        if existing.rows != rows:
            lines.append(f"split sizes differ: {existing.rows} in the file, {rows} now")
        if lines:
            raise DpokitError(
                f"{path} was made from other inputs: {'; '.join(lines)}. "
                "Pass --overwrite to replace it, or write to another --out"
            )
        return existing
    _create_cache_file(path, attrs, rows, token_counts if attrs.get("per_token") else None, group_sizes)
    return open_cache(path)


def check_cache_target(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, before any work, an ``--out`` that ref-logps must not write.

    A directory is refused (the cache is one file). An existing file must be a reference cache,
    with or without `overwrite`: without it the file is resumed, with it replaced; anything else is
    the user's and stays.
    """
    path = Path(path)
    if path.is_dir():
        raise DpokitError(
            f"--out {path} is a directory; the reference cache is one file: give a file path such as {path / 'ref.h5'}"
        )
    if path.exists():
        check_replaceable(path, "cache", overwrite=True)


def _create_cache_file(
    path: Path,
    attrs: dict[str, Any],
    rows: dict[str, int],
    token_counts: Optional[dict[str, np.ndarray]] = None,
    group_sizes: Optional[dict[str, np.ndarray]] = None,
) -> None:
    """Write an empty cache (every dataset allocated, nothing done) to a temporary file, then rename it.

    The file is its full size from the start, so its room is checked first (`check_room`): commits only
    overwrite bytes in place, and HDF5 crashes rather than raises when a write runs out of room."""
    import h5py

    ranked = attrs.get("shape") == "ranked"
    if ranked and group_sizes is None:
        raise ValueError("a ranked cache needs the group sizes of every split")
    datasets = row_datasets(ranked)
    # Cache rows per split: one per pair, or one per ranked completion.
    cache_rows = {split: int(np.sum(group_sizes[split])) if ranked else n for split, n in rows.items()}
    per_row = sum(np.dtype(dtype).itemsize for dtype in datasets.values()) + 1 + 4  # values, done, row_crc
    needed = sum(n * per_row for n in cache_rows.values()) + 8 * sum(rows.values()) + (1 << 16)  # + HDF5's own
    if token_counts is not None:
        needed += sum(4 * int(np.sum(counts)) + 8 * (len(counts) + 1) for counts in token_counts.values())
    check_room(path, needed)

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w", libver=LIBVER, track_order=True) as handle:
            for key, value in attrs.items():
                handle.attrs[key] = value
            for split, n in cache_rows.items():
                group = handle.create_group(split)
                # Writing the initial values (not just a fill value) allocates the storage now, so later
                # commits only overwrite bytes in place and never change the file's structure.
                for name, dtype in datasets.items():
                    initial = np.full(n, np.nan, dtype) if dtype == np.float32 else np.zeros(n, dtype)
                    group.create_dataset(name, data=initial, track_times=False)
                group.create_dataset(DONE, data=np.zeros(n, dtype=bool), track_times=False)
                group.create_dataset(ROW_CRC, data=np.zeros(n, dtype=np.uint32), track_times=False)
                if ranked:
                    offsets = np.concatenate([[0], np.cumsum(group_sizes[split])]).astype(np.int64)
                    group.create_dataset(GROUP_OFFSETS, data=offsets, track_times=False)
                if token_counts is not None:  # per cache row, all allocated now
                    offsets = np.concatenate([[0], np.cumsum(token_counts[split])]).astype(np.int64)
                    group.create_dataset(TOKEN_OFFSETS, data=offsets, track_times=False)
                    group.create_dataset(
                        TOKEN_LOGPS, data=np.full(int(offsets[-1]), np.nan, np.float32), track_times=False
                    )

    replace_atomically(path, "cache", write)


class RefCacheWriter:
    """Commits computed rows to a cache made by `create_or_resume_cache`, by example index.

    A commit costs mostly per HDF5 call, little per row (bench/ref_writer_results.md): each dataset is
    written with one point selection, a per-token cache's offsets are read once per split (they are
    fixed when the file is made), and the pass commits every rank's rows of a step in one `write`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows_written = 0
        self.token_offsets: dict[str, np.ndarray] = {}  # split -> its ``token_offsets``, read at its first commit
        self.group_offsets: dict[str, np.ndarray] = {}  # split -> a ranked split's ``group_offsets``

    def write(
        self,
        split: str,
        index: np.ndarray,
        chosen_logps: np.ndarray,
        rejected_logps: np.ndarray,
        chosen_tokens: np.ndarray,
        rejected_tokens: np.ndarray,
        token_logps: Optional[Sequence[np.ndarray]] = None,
    ) -> None:
        """Write rows `index` of `split` and mark them done, in one short open-write-flush-close.

        `token_logps` (a per-token cache): for each row, its chosen then rejected tokens' log-probs.

        Values are flushed before ``done`` is set, so a row is never marked done without its values.
        """
        values = {
            "chosen_logps": chosen_logps,
            "rejected_logps": rejected_logps,
            "chosen_tokens": chosen_tokens,
            "rejected_tokens": rejected_tokens,
        }
        self.write_rows(split, index, values, token_logps)

    def write_groups(
        self,
        split: str,
        index: np.ndarray,
        logps: np.ndarray,
        tokens: np.ndarray,
        token_logps: Optional[Sequence[np.ndarray]] = None,
    ) -> None:
        """Write ranked groups `index` of `split`: `logps`/`tokens` ``[C]`` hold their completions, group by group
        in `index` order (`token_logps`: one array per completion), and mark them done, in one commit."""
        if len(index) == 0:
            return
        if split not in self.group_offsets:
            with _open_h5(self.path, "r") as handle:
                self.group_offsets[split] = handle[split][GROUP_OFFSETS][()]
        offsets = self.group_offsets[split]
        index = np.asarray(index, dtype=np.int64)
        rows = np.concatenate([np.arange(offsets[g], offsets[g + 1]) for g in index])
        if rows.size != len(logps):
            raise DpokitError(f"{self.path}: {len(logps)} completion values for groups of {rows.size} completions")
        self.write_rows(split, rows, {"completion_logps": logps, "completion_tokens": tokens}, token_logps)

    def write_rows(
        self,
        split: str,
        index: np.ndarray,
        values: dict[str, np.ndarray],
        token_logps: Optional[Sequence[np.ndarray]] = None,
    ) -> None:
        """Write cache rows `index` of `split` (`values` by dataset name, `token_logps` one array per row) and mark
        them done, in one short open-write-flush-close. Values are flushed before ``done`` is set, so a row is
        never marked done without its values."""
        if len(index) == 0:
            return
        order = np.argsort(index, kind="stable")  # a point selection is written in ascending order
        rows = np.asarray(index, dtype=np.int64)[order]
        dtypes = {**ROW_DATASETS, **RANKED_DATASETS}
        columns = {name: np.asarray(array, dtype=dtypes[name])[order] for name, array in values.items()}
        per_row = [np.asarray(token_logps[k], dtype=np.float32) for k in order] if token_logps is not None else None
        with _open_h5(self.path, "r+") as handle:
            group = handle[split]
            for name, column in columns.items():
                _write_points(group[name], rows, column)
            if ROW_CRC in group:
                _write_points(group[ROW_CRC], rows, row_checksums(columns, per_row if TOKEN_LOGPS in group else None))
            if token_logps is not None and TOKEN_LOGPS in group:
                if split not in self.token_offsets:
                    self.token_offsets[split] = group[TOKEN_OFFSETS][()]
                offsets = self.token_offsets[split]
                positions = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in rows])
                flat = np.concatenate(per_row)
                if flat.size != positions.size:
                    raise DpokitError(f"{self.path}: per-token values do not match the rows' token counts")
                _write_points(group[TOKEN_LOGPS], positions, flat)  # rows ascending, so positions ascending too
            handle.flush()
            self.mark_done(group, rows)

    def record_checked_layout(self, name: str) -> None:
        """Record the batch layout the pass checked against the model's own logits (`dpokit.fidelity`), so
        that training from this cache can rely on that check instead of repeating it."""
        with _open_h5(self.path, "r+") as handle:
            handle.attrs["checked_layout"] = name

    def mark_done(self, group, rows: np.ndarray) -> None:
        """Set ``done`` for `rows` of a split's open group (their values are already flushed)."""
        _write_points(group[DONE], rows, np.ones(len(rows), dtype=bool))
        self.rows_written += len(rows)


def row_checksums(columns: dict[str, np.ndarray], token_logps: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
    """CRC-32 of each row's values, packed in `columns`' order (a pair cache's `ROW_DATASETS`, a ranked one's
    `RANKED_DATASETS`), and of its per-token values, when given."""
    dtypes = {**ROW_DATASETS, **RANKED_DATASETS}
    first = next(iter(columns.values()))
    packed = np.empty(len(first), dtype=[(name, dtypes[name]) for name in columns])
    for name in columns:
        packed[name] = columns[name]
    view, width, n = memoryview(packed.tobytes()), packed.dtype.itemsize, len(packed)
    if token_logps is None:
        return np.fromiter((zlib.crc32(view[i * width : (i + 1) * width]) for i in range(n)), dtype=np.uint32, count=n)
    return np.fromiter(
        (
            zlib.crc32(
                np.ascontiguousarray(token_logps[i], dtype=np.float32).tobytes(),
                zlib.crc32(view[i * width : (i + 1) * width]),
            )
            for i in range(n)
        ),
        dtype=np.uint32,
        count=n,
    )


def _write_points(dataset, points: np.ndarray, values: np.ndarray) -> None:
    """``dataset[points] = values`` (`points` ascending) as one HDF5 write of a point selection: h5py's
    fancy indexing costs 2-3x more for the few scattered rows of a commit (bench/ref_writer_results.md)."""
    import h5py

    selection = dataset.id.get_space()
    selection.select_elements(points.reshape(-1, 1))
    dataset.id.write(h5py.h5s.create_simple((len(points),)), selection, np.ascontiguousarray(values))


def subset_cache(
    source: RefCache, rows: dict[str, np.ndarray], path: str | os.PathLike, attrs: dict[str, Any]
) -> RefCache:
    """A new cache at `path` holding rows ``rows[split]`` of `source`, renumbered ``0..K-1`` in that order, with
    root attributes `attrs`: the cache of a prepared dataset made of those rows (``dpokit cache audit
    --write-filtered``). Values are copied, not recomputed; every listed row of `source` must be done.

    A file already at `path` is replaced only if it is a reference cache (`check_cache_target`).
    """
    path = Path(path)
    tables = {split: source.logps(split) for split in rows}
    token_counts = {
        split: (table.chosen_tokens + table.rejected_tokens).numpy()[rows[split]] for split, table in tables.items()
    }
    with WriterLock(lock_path(Path(path)), f"reference cache {path}"):
        create_or_resume_cache(path, attrs, {split: len(index) for split, index in rows.items()}, True, token_counts)
        writer = RefCacheWriter(path)
        for split, index in rows.items():
            table = tables[split]
            token_logps = None
            if table.token_logps is not None:
                offsets, values = table.token_offsets.numpy(), table.token_logps.numpy()
                token_logps = [values[offsets[i] : offsets[i + 1]] for i in index]
            columns = {name: getattr(table, name).numpy()[index] for name in ROW_DATASETS}
            writer.write(split, np.arange(len(index)), **columns, token_logps=token_logps)
    return open_cache(path)


def write_cache_values(
    path: str | os.PathLike,
    attrs: dict[str, Any],
    values: dict[str, dict[str, np.ndarray]],
    group_sizes: Optional[dict[str, np.ndarray]] = None,
) -> RefCache:
    """A new cache at `path` with root attributes `attrs`, every row written from `values` and done: per split, a
    pair cache's `ROW_DATASETS` ``[N]``, or a ranked one's `RANKED_DATASETS` ``[C]`` group by group with
    `group_sizes` ``[N]`` (``dpokit select`` from samples that carry their reference log-probs). Values are
    copied, not computed; a sequence-only cache.

    A file already at `path` is replaced only if it is a reference cache (`check_cache_target`).
    """
    path = Path(path)
    ranked = attrs.get("shape") == "ranked"
    rows = {
        split: len(group_sizes[split]) if ranked else len(columns["chosen_logps"]) for split, columns in values.items()
    }
    with WriterLock(lock_path(path), f"reference cache {path}"):
        create_or_resume_cache(path, attrs, rows, True, None, group_sizes if ranked else None)
        writer = RefCacheWriter(path)
        for split, columns in values.items():
            writer.write_rows(split, np.arange(len(next(iter(columns.values())))), columns)
    return open_cache(path)
