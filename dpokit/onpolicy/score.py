"""`dpokit score`: a reward model's (or a Python function's) score for every sampled completion, into ``scored/``.

Layout::

    scored/
      .dpokit-artifact.json   kind "scored"
      manifest.json           what was scored with what (samples and their SHA-256, the scorer), counts, the scores'
                              mean/std/min/max, and whether it is complete
      batches/                one JSON file per scored batch, {"index": [...], "scores": [...]} (flat completion
                              indices ``prompt * k + j``): what a resumed run does not score again
      scored.jsonl            when complete: the samples' records in index order, each with ``"scores"`` (k floats);
                              their other keys (``ref_logps``, ``ref_tokens`` of ``sample --ref-logps``) unchanged

What a reward model scores: its own tokenizer's rendering of the conversation, the prompt's messages and the
completion as an assistant turn: ``apply_chat_template(prompt + [assistant], tokenize=False)`` tokenized without
added special tokens (the template writes its own), or, for a tokenizer without a chat template, the ids `dpokit
prepare` makes of a plain prompt and completion (turns joined by blank lines, the separator, the completion and
EOS: `dpokit.data.tokenize.PairTokenizer.plain_ids`). The score is the model's one logit
(``AutoModelForSequenceClassification`` with ``num_labels=1``), which transformers reads at each row's last token that
is not the pad token; rows are right-padded with the model's pad token (its EOS, else 0, when the config names none).
float32 on CPU, bfloat16 on CUDA. A ``--scorer pkg.module:function`` is called as ``function(prompts, completions)``
on a batch (one prompt's messages per completion) and must return one finite number per completion.

Batches: a reward model's pending completions sorted longest first (by characters) and cut into ``--batch-size``
(`dpokit.reference.compute.plan_batches`), a function's in index order. Batch files are written through a
temporary name renamed into place, so an interrupted run leaves whole batches; the same command scores only the
completions no batch file holds. Removing whole batches from the sorted order leaves the others as they were, so a
resumed run scores the same batches an uninterrupted one would, and writes the same values. With N processes batch
``b`` goes to rank ``b % N``; each rank writes its own batch files and rank 0 writes ``scored.jsonl``, so the result
equals one process's.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import numbers
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from rich.table import Table

from dpokit import __version__, log
from dpokit.artifacts import (
    check_replaceable,
    is_dpokit_artifact,
    not_own_reason,
    replace_atomically,
    replace_within,
    write_marker,
    write_text_within,
)
from dpokit.data.tokenize import LengthLimits, PairTokenizer, load_tokenizer
from dpokit.distributed import (
    destroy_distributed,
    gather_to_main,
    init_distributed,
    launch_workers,
    launched_by_torchrun,
    main_result,
)
from dpokit.errors import DpokitError
from dpokit.fingerprint import file_sha256, weights_fingerprint
from dpokit.lock import WriterLock, lock_path
from dpokit.metrics import summary_table, training_progress
from dpokit.model import check_model_path, default_device, dtype_name, pad_token_id, resolve_dtype
from dpokit.onpolicy.sample import SAMPLES_FILE, jsonl_records, samples_manifest
from dpokit.onpolicy.sampled_reference import record_problem
from dpokit.reference.cache import short_value
from dpokit.reference.compute import check_gpu_count, model_identity, plan_batches

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SCORED_NAME = "scored.jsonl"
BATCHES_DIR = "batches"
SCORED_ENTRIES = (MANIFEST_NAME, BATCHES_DIR, SCORED_NAME)  # what dpokit writes at a scored folder's top level
# How the samples' prompts were rendered (the template's text, or the plain separator): select records them as
# prepare does, so that `train` renders its own prompts alike.
PASSED_ON = ("chat_template_text", "separator")
RECORD_KEYS = ("index", "prompt", "prompt_ids", "completions", "completion_ids", "finished")
# The manifest keys that say what a folder was scored from: a resumed run must match them all.
IDENTITY_KEYS = (
    "samples",
    "samples_fingerprint",
    "scorer",
    "reward_model",
    "reward_model_fingerprint",
    "dtype",
    "function",
)


@dataclass
class ScoreOptions:
    """The arguments of `dpokit score`: exactly one of `reward_model` and `scorer`."""

    samples: str
    out: str
    reward_model: Optional[str] = None
    scorer: Optional[str] = None  # pkg.module:function
    batch_size: int = 8
    gpus: int = 1
    overwrite: bool = False


@dataclass
class ScoreReport:
    """What a run did (rank 0's): completions scored now and in all, the scores' statistics, seconds."""

    out: Path
    scored_now: int
    completions: int
    scores: dict[str, float]
    seconds: float


# ----------------------------------------------------------------------------------------------
# reading samples/ and scored/


@dataclass
class JsonlFolder:
    """A complete samples/ or scored/ folder: its path, its manifest and the JSONL file of its records."""

    path: Path
    manifest: dict[str, Any]
    records_path: Path

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def num_prompts(self) -> int:
        return int(self.manifest["num_prompts"])


def read_samples(path: str | os.PathLike) -> JsonlFolder:
    """A complete `dpokit sample` output (`dpokit.onpolicy.sample.samples_manifest` checks it)."""
    manifest = samples_manifest(path)
    check_group_sizes(Path(path) / MANIFEST_NAME, manifest)
    return JsonlFolder(path=Path(path), manifest=manifest, records_path=Path(path) / SAMPLES_FILE)


def read_scored(path: str | os.PathLike) -> JsonlFolder:
    """A complete `dpokit score` output, checked: its marker, manifest (format, k, complete) and scored.jsonl."""
    path = Path(path)
    finish = "run the same `dpokit score` command again to finish it"
    reason = not_own_reason(path, "scored")
    if reason is not None:
        raise DpokitError(f"{path} is not a `dpokit score` output ({reason}); give the --out of dpokit score")
    manifest_path = path / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise DpokitError(f"{manifest_path}: unreadable ({exc}); {finish}") from exc
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("kind") != "scored":
        raise DpokitError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r}, kind {manifest.get('kind')!r}; "
            f"this dpokit reads format_version {FORMAT_VERSION}, kind 'scored': score the samples again with it"
        )
    check_group_sizes(manifest_path, manifest)
    if not manifest.get("complete") or not (path / SCORED_NAME).is_file():
        raise DpokitError(f"{path} is not complete (no {SCORED_NAME}, or its manifest says so); {finish}")
    return JsonlFolder(path=path, manifest=manifest, records_path=path / SCORED_NAME)


def check_group_sizes(manifest_path: Path, manifest: dict[str, Any]) -> None:
    """The manifest's ``k`` and ``num_prompts`` are positive whole numbers (what reading the records relies on)."""
    for key in ("k", "num_prompts"):
        if not isinstance(manifest.get(key), int) or manifest[key] < 1:
            raise DpokitError(f"{manifest_path}: {key!r} is {manifest.get(key)!r}, not a positive whole number")


def folder_records(folder: JsonlFolder, scored: bool = False) -> Iterator[dict[str, Any]]:
    """The records of a samples/ (or, `scored`, a scored/) folder in index order, each checked: its keys, index and
    k completions (and k finite scores; and when the manifest says the sampler computed them, ``--ref-logps``, k
    reference log-probs and token counts); an error names the file, the line and the key. A record's other keys
    pass through as they are."""
    keys = RECORD_KEYS + (("scores",) if scored else ())
    k = folder.k
    count = 0
    for count, record in enumerate(jsonl_records(folder.records_path, "make the folder again"), start=1):
        where = f"{folder.records_path}:{count}"
        missing = [key for key in keys if key not in record] if isinstance(record, dict) else list(keys)
        if missing:
            raise DpokitError(f"{where}: the record lacks {', '.join(map(repr, missing))}; make the folder again")
        if record["index"] != count - 1:
            raise DpokitError(f"{where}: 'index' is {record['index']!r}, expected {count - 1} (records in order)")
        for key in keys[3:]:
            if not isinstance(record[key], list) or len(record[key]) != k:
                found = len(record[key]) if isinstance(record[key], list) else type(record[key]).__name__
                raise DpokitError(f"{where}: {key!r} has {found} entries; the manifest says k={k}")
        if scored and not all(isinstance(s, (int, float)) and math.isfinite(s) for s in record["scores"]):
            raise DpokitError(f"{where}: 'scores' holds a value that is not a finite number: {record['scores']}")
        problem = record_problem(record, k) if folder.manifest.get("ref_logps") else None
        if problem is not None:
            raise DpokitError(f"{where}: {problem}; make the folder again")
        yield record
    if count != folder.num_prompts:
        raise DpokitError(
            f"{folder.records_path} has {count} records; its manifest says num_prompts={folder.num_prompts}: "
            "make the folder again"
        )


# ----------------------------------------------------------------------------------------------
# scorers


def scorer_function(name: str) -> Callable[[list[list[dict]], list[str]], Sequence[float]]:
    """The function ``package.module:function`` names (``--scorer``), imported."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise DpokitError(f"--scorer {name!r}: give the module and the function, as package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DpokitError(
            f"--scorer {name!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?"
        ) from exc
    function = getattr(module, attr, None)
    if function is None:
        raise DpokitError(f"--scorer {name!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(function):
        raise DpokitError(f"--scorer {name!r} is a {type(function).__name__}, not a function(prompts, completions)")
    return function


def completion_name(flat: int, k: int) -> str:
    """How messages name the completion of flat index ``prompt * k + j``."""
    prompt, j = divmod(flat, k)
    return f"prompt {prompt} completion {j}"


def checked_scores(values: Any, index: Sequence[int], k: int, what: str) -> np.ndarray:
    """`values` as float64 ``[len(index)]``, or an error naming `what` returned them: not one number per completion
    (`index`: the flat completion indices ``prompt * k + j``), or a value that is not finite."""
    if hasattr(values, "tolist"):  # a numpy array or a tensor
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise DpokitError(
            f"{what} returned a {type(values).__name__}; it must return a list of one float per completion"
        )
    if len(values) != len(index):
        raise DpokitError(
            f"{what} returned {len(values)} scores for {len(index)} completions; it must return one per completion"
        )
    for value, flat in zip(values, index):
        if not isinstance(value, numbers.Real):
            raise DpokitError(
                f"{what} returned {value!r} ({type(value).__name__}) for {completion_name(int(flat), k)}; scores are numbers"
            )
        if not math.isfinite(value):
            raise DpokitError(f"{what} returned {value} for {completion_name(int(flat), k)}; scores must be finite")
    return np.asarray(values, dtype=np.float64)


class FunctionScorer:
    """``--scorer pkg.module:function``: the function's scores of a batch, checked."""

    bucket = False  # batches in index order: a judge sees the completions as they were sampled

    def __init__(self, name: str):
        self.name = name
        self.what = f"--scorer {name}"
        self.function = scorer_function(name)

    def __call__(self, prompts: list[list[dict]], completions: list[str], names: list[str]) -> Any:
        """The function's scores of a batch, unchecked (`checked_scores` checks them; `names`: unused)."""
        try:
            return self.function(prompts, completions)
        except DpokitError:
            raise
        except Exception as exc:  # the user's function: its error, named
            raise DpokitError(f"{self.what} raised {type(exc).__name__}: {exc}") from exc


def check_reward_model_config(path: str) -> None:
    """Refuse, before loading weights, a model that is not a one-output sequence classifier (a causal LM's config
    has ``num_labels=2``)."""
    from transformers import AutoConfig

    check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise DpokitError(f"cannot read the reward model's config from {path!r}: {exc}") from exc
    if config.num_labels != 1:
        raise DpokitError(
            f"reward model {path} has num_labels={config.num_labels}; dpokit scores with a reward model of one output "
            "(AutoModelForSequenceClassification, num_labels=1): give one, or score with --scorer pkg.module:function"
        )


def load_reward_model(path: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A reward model (one-output ``AutoModelForSequenceClassification``) in eval mode on `device`, with a pad token.

    Refused: a config of another number of outputs, and a checkpoint without some of the model's weights (a causal
    LM loaded this way gets a randomly initialised score head)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    check_reward_model_config(path)
    hf_logging.disable_progress_bar()
    try:
        with hf_warnings_off():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, output_loading_info=True
            )
    except (OSError, ValueError) as exc:
        raise DpokitError(f"cannot load reward model {path!r} as a sequence classifier: {exc}") from exc
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DpokitError(
            f"reward model {path} lacks the weights {shown}, which would be random: is it a trained reward model "
            "(AutoModelForSequenceClassification, num_labels=1)?"
        )
    if model.config.pad_token_id is None:  # transformers refuses batches of more than one row without one
        model.config.pad_token_id = pad_token_id(model)
        log.debug(f"reward model {path}: no pad token in its config; padding with id {model.config.pad_token_id}")
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def hf_warnings_off() -> Iterator[None]:
    """transformers' warnings off while loading (a missing weight is refused with dpokit's own message)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def reward_model_ids(
    pair_tokenizer: PairTokenizer, prompts: list[list[dict]], completions: list[str]
) -> list[list[int]]:
    """The ids a reward model scores for each (prompt, completion): its chat template's rendering of the conversation
    with the completion as the assistant's turn, or without a template the ids `prepare` makes of plain text."""
    tokenizer = pair_tokenizer.tokenizer
    conversations = [prompt + [{"role": "assistant", "content": text}] for prompt, text in zip(prompts, completions)]
    if pair_tokenizer.uses_chat_template:
        return pair_tokenizer.encode([tokenizer.apply_chat_template(c, tokenize=False) for c in conversations])
    groups = pair_tokenizer.plain_ids([(c[:-1], [c[-1:]]) for c in conversations])
    return [group.prompt_ids + group.completion_ids[0] for group in groups]


class RewardModelScorer:
    """``--reward-model``: its logit for each completion, on its own tokenizer's rendering of the conversation."""

    bucket = True  # longest first, so that a batch holds completions of similar length (and little padding)

    def __init__(self, path: str, device: torch.device):
        self.name = path
        self.what = f"reward model {path}"
        self.device = device
        tokenizer = load_tokenizer(path)
        if not tokenizer.chat_template and tokenizer.eos_token_id is None:
            raise DpokitError(
                f"reward model {path}: its tokenizer has no chat template and no EOS token, so dpokit cannot render a "
                "conversation for it; give a reward model whose tokenizer has a chat template"
            )
        self.pair_tokenizer = PairTokenizer(tokenizer, LengthLimits())
        self.model = load_reward_model(path, resolve_dtype("auto", device), device)
        self.pad_id = int(self.model.config.pad_token_id)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    def __call__(self, prompts: list[list[dict]], completions: list[str], names: list[str]) -> np.ndarray:
        """The model's logit for each completion ``[B]`` (`names`: how messages name each one)."""
        sequences = reward_model_ids(self.pair_tokenizer, prompts, completions)
        longest = max(range(len(sequences)), key=lambda row: len(sequences[row]))
        if self.max_positions and len(sequences[longest]) > self.max_positions:
            raise DpokitError(
                f"{self.what} reads at most {self.max_positions} tokens (max_position_embeddings) and {names[longest]} "
                f"makes {len(sequences[longest])}; sample shorter completions (--max-new-tokens) or use a reward model "
                "that reads longer inputs"
            )
        input_ids = torch.full((len(sequences), len(sequences[longest])), self.pad_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(sequences):  # right-padded
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).logits
        return logits[:, 0].float().cpu().numpy()  # [B]


def load_scorer(options: ScoreOptions, device: torch.device) -> RewardModelScorer | FunctionScorer:
    """The scorer the options name: the reward model loaded on `device`, or the function imported."""
    if options.reward_model:
        return RewardModelScorer(options.reward_model, device)
    return FunctionScorer(options.scorer)


# ----------------------------------------------------------------------------------------------
# the scored folder


def scored_identity(options: ScoreOptions, samples: JsonlFolder, device: torch.device) -> dict[str, Any]:
    """The manifest keys that say what the folder is scored from (`IDENTITY_KEYS`)."""
    identity = {"samples": str(samples.path.resolve()), "samples_fingerprint": file_sha256(samples.records_path)}
    if options.reward_model:
        return {
            **identity,
            "scorer": "reward_model",
            "reward_model": model_identity(options.reward_model),
            "reward_model_fingerprint": weights_fingerprint(options.reward_model),
            "dtype": dtype_name(resolve_dtype("auto", device)),
        }
    return {**identity, "scorer": "function", "function": options.scorer}


def check_score_target(options: ScoreOptions) -> None:
    """Refuse, before any work, an ``--out`` that is neither new, empty, nor a `dpokit score` output."""
    if not is_dpokit_artifact(options.out, "scored"):
        check_replaceable(options.out, "scored", options.overwrite, inputs=(options.samples, options.reward_model))


def begin_scored_folder(options: ScoreOptions, samples: JsonlFolder, identity: dict[str, Any]) -> np.ndarray:
    """Create the scored folder (or take up the one there, scored from the same inputs); its flat completion indices
    still to score, ascending. A folder scored from other inputs is replaced only with ``--overwrite``."""
    out = Path(options.out)
    total = samples.num_prompts * samples.k
    if is_dpokit_artifact(out, "scored") and not options.overwrite:
        try:
            existing = json.loads((out / MANIFEST_NAME).read_text())
        except (OSError, ValueError) as exc:
            raise DpokitError(
                f"{out / MANIFEST_NAME}: unreadable ({exc}); pass --overwrite to score again, or another --out"
            ) from exc
        differ = [
            f"{key} differs: {short_value(existing.get(key))} there, {short_value(identity.get(key))} now"
            for key in IDENTITY_KEYS
            if existing.get(key) != identity.get(key)
        ]
        if differ:
            raise DpokitError(
                f"{out} was scored from other inputs: {'; '.join(differ)}. Pass --overwrite to replace it, "
                "or write to another --out"
            )
        done = ~np.isnan(batch_scores(out, total))
        return np.flatnonzero(~done)
    check_replaceable(out, "scored", options.overwrite, inputs=(options.samples, options.reward_model))
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "scored",
        **identity,
        "model": samples.manifest.get("model"),
        "adapter": samples.manifest.get("adapter"),
        "tokenizer": samples.manifest.get("tokenizer"),
        **{key: samples.manifest[key] for key in PASSED_ON if key in samples.manifest},
        "ref_logps": samples.manifest.get("ref_logps"),  # the records' reference values: what a cache of them claims
        "num_prompts": samples.num_prompts,
        "k": samples.k,
        "complete": False,
        "counts": None,
        "scores": None,
        "dpokit_version": __version__,
    }

    def create(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / BATCHES_DIR).mkdir()
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")

    replace_atomically(out, "scored", create)
    write_marker(out, "scored", SCORED_ENTRIES)  # scored.jsonl comes later: a later --overwrite may replace it
    return np.arange(total)


def batch_file(out: Path, index: np.ndarray) -> Path:
    """A batch's file, named by its smallest index: a new batch never takes a written one's name, as it holds only
    indices no file holds."""
    return out / BATCHES_DIR / f"batch-{int(index.min()):010d}.json"


def write_batch(out: Path, index: np.ndarray, scores: np.ndarray) -> None:
    record = {"index": [int(i) for i in index], "scores": [float(s) for s in scores]}
    write_text_within(out, "scored", batch_file(out, index), json.dumps(record) + "\n")


def batch_scores(out: Path, total: int) -> np.ndarray:
    """Every score the batch files hold, by flat completion index ``[total]`` (NaN: not scored yet). A file that
    does not read as a batch this folder wrote is an error naming it."""
    scores = np.full(total, np.nan)
    for path in sorted((out / BATCHES_DIR).glob("batch-*.json")):
        try:
            record = json.loads(path.read_text())
            index = np.asarray(record["index"], dtype=np.int64)
            values = np.asarray(record["scores"], dtype=np.float64)
            valid = index.shape == values.shape and index.ndim == 1 and len(index) > 0
            valid = valid and index.min() >= 0 and index.max() < total and np.isfinite(values).all()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            valid, exc_text = False, f" ({exc})"
        else:
            exc_text = ""
        if not valid:
            raise DpokitError(
                f"{path} is not a batch of this folder's {total} completions{exc_text}; delete it (its completions "
                "are scored again) and run the command again"
            )
        if not np.isnan(scores[index]).all():
            raise DpokitError(f"{path} scores completions another batch file scores too; delete it and run again")
        scores[index] = values
    return scores


def finish_scored(out: Path, samples: JsonlFolder, scored_now: int) -> dict[str, Any]:
    """Write scored.jsonl (the samples' records with their scores) and mark the manifest complete; the manifest."""
    scores = batch_scores(out, samples.num_prompts * samples.k)
    missing = np.flatnonzero(np.isnan(scores))
    if len(missing):
        raise DpokitError(
            f"{out}: {len(missing)} completions have no score (the first: prompt {missing[0] // samples.k}); "
            "run the command again to score them"
        )
    k, unfinished = samples.k, 0

    def write(tmp: Path) -> None:
        nonlocal unfinished
        with open(tmp, "w", encoding="utf-8") as stream:
            for record in folder_records(samples):
                i = record["index"]
                record["scores"] = scores[i * k : (i + 1) * k].tolist()
                unfinished += sum(not finished for finished in record["finished"])
                stream.write(json.dumps(record) + "\n")

    replace_within(out, "scored", out / SCORED_NAME, write)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest.update(
        complete=True,
        counts={
            "prompts": samples.num_prompts,
            "completions": len(scores),
            "unfinished": unfinished,
            "scored_by_last_run": scored_now,
            "batch_files": len(list((out / BATCHES_DIR).glob("batch-*.json"))),
        },
        scores=score_stats(scores),
    )
    write_text_within(out, "scored", out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest


def score_stats(scores: np.ndarray) -> dict[str, float]:
    """The manifest's ``scores``: mean, (population) std, min and max over every completion."""
    return {
        "mean": float(scores.mean()),
        "std": float(scores.std()),
        "min": float(scores.min()),
        "max": float(scores.max()),
    }


# ----------------------------------------------------------------------------------------------
# the pass


def check_score_options(options: ScoreOptions) -> None:
    """Refuse option values that cannot work, before anything is read."""
    if bool(options.reward_model) == bool(options.scorer):
        raise DpokitError(
            "give one scorer: --reward-model MODEL (a reward model) or --scorer pkg.module:function (a Python function)"
        )
    if options.batch_size < 1:
        raise DpokitError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.gpus < 1:
        raise DpokitError(f"--gpus must be at least 1, got {options.gpus}")


def run_score(options: ScoreOptions) -> Path:
    """Score (or finish scoring) a samples folder into ``options.out``, launching ``options.gpus`` workers when asked.

    The cheap checks come first, in this process: the options, the samples folder, the scorer's config or import,
    and the target folder."""
    check_score_options(options)
    read_samples(options.samples)
    if options.reward_model:
        check_reward_model_config(options.reward_model)
    else:
        scorer_function(options.scorer)
    check_score_target(options)
    if options.gpus > 1 and not launched_by_torchrun():
        check_gpu_count(options.gpus)
        launch_workers(options.gpus, score_process, (options,))
    else:
        score_process(options)
    return Path(options.out)


def score_process(options: ScoreOptions) -> Optional[ScoreReport]:
    """The pass as one process runs it (every worker runs this): rank 0 opens the folder and writes scored.jsonl,
    every rank scores its batches. Returns rank 0's report (None on the other ranks)."""
    started = time.perf_counter()
    started_group = not torch.distributed.is_initialized()
    info = init_distributed()
    out = Path(options.out)
    lock = WriterLock(lock_path(out), f"scored folder {out}")  # one writer per folder
    try:
        main_result(lambda: lock.acquire() and None)
        samples = read_samples(options.samples)
        device = default_device()
        pending = main_result(lambda: begin_scored_folder(options, samples, scored_identity(options, samples, device)))
        if len(pending):
            score_pending(options, samples, pending, device, info)
        if not info.is_main:
            return None
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        if len(pending) or not manifest.get("complete") or not (out / SCORED_NAME).is_file():
            manifest = finish_scored(out, samples, len(pending))
        report = ScoreReport(out, len(pending), manifest["counts"]["completions"], manifest["scores"],
                             time.perf_counter() - started)  # fmt: skip
        log.console().print(report_table(report))
        return report
    finally:
        lock.release()
        if started_group:
            destroy_distributed()


def score_pending(options: ScoreOptions, samples: JsonlFolder, pending: np.ndarray, device: torch.device, info) -> None:
    """Score the `pending` completions in batches, batch ``b`` on rank ``b % world_size``, each batch written to
    its file as it is done. Every rank joins every step's gather (the progress bar's count, on rank 0)."""
    prompts, completions = sample_texts(samples)
    scorer = load_scorer(options, device)
    k = samples.k
    lengths = np.array(
        [len(text) + sum(len(m["content"]) for m in prompts[i // k]) for i, text in enumerate(completions)]
    )
    batches = plan_batches(pending, lengths, options.batch_size, bucket=scorer.bucket)
    mine = batches[info.rank :: info.world_size]
    steps = math.ceil(len(batches) / info.world_size)
    out = Path(options.out)
    start, done = time.perf_counter(), 0
    with training_progress(console=log.console(stderr=True), enabled=info.is_main) as progress:
        task = progress.add_task("score", total=len(pending), rate="", status="")
        for step in range(steps):
            index = mine[step] if step < len(mine) else None
            if index is not None:
                names = [completion_name(int(i), k) for i in index]
                values = scorer([prompts[i // k] for i in index], [completions[i] for i in index], names)
                write_batch(out, index, checked_scores(values, index, k, scorer.what))
            counts = gather_to_main(0 if index is None else len(index))
            if counts is not None:
                done += sum(counts)
                rate = f"{done / max(time.perf_counter() - start, 1e-9):,.1f} completions/s"
                progress.update(task, completed=done, rate=rate)


def sample_texts(samples: JsonlFolder) -> tuple[list[list[dict]], list[str]]:
    """Each prompt's messages ``[num_prompts]`` and each completion's text ``[num_prompts * k]``, flat by
    ``prompt * k + j``."""
    prompts, completions = [], []
    for record in folder_records(samples):
        prompts.append(record["prompt"])
        completions.extend(record["completions"])
    return prompts, completions


def report_table(report: ScoreReport) -> Table:
    """The closing table: completions scored, the scores' mean, std, min and max, the time."""
    stats = report.scores
    return summary_table(
        f"dpokit score → {report.out}",
        [
            ("completions scored", f"{report.scored_now:,} now / {report.completions:,}"),
            ("score mean ± std", f"{stats['mean']:.4g} ± {stats['std']:.4g}"),
            ("score min / max", f"{stats['min']:.4g} / {stats['max']:.4g}"),
            ("seconds", f"{report.seconds:.1f}"),
        ],
    )
