"""`dpokit select`: pairs or ranked groups from scored completions, written as prepared data.

The output is a ``prepared/`` directory (`dpokit.data.prepared`) that `dpokit ref-logps` and `dpokit train` read as
they read `dpokit prepare`'s: the token ids come straight from the samples (the prompt's ``prompt_ids``, a
completion's ``completion_ids`` with its end-of-turn token), never tokenized again.

Rules, for each prompt's k completions and their scores (higher is better):

- ``best_worst``: one pair, the first highest-scored completion against the first lowest-scored.
- ``best_random``: one pair, the first highest-scored against one drawn uniformly from those scored strictly lower.
- ``all``: one ranked group of all k completions with their scores (the ``ranked`` shape; ranked losses).
- ``rso``: RSO's statistical rejection sampling (Liu et al. 2023, "Statistical Rejection Sampling Improves
  Preference Optimization", appendix A.1, Algorithm 1), `rso_accept`: rounds over the remaining candidates, each
  accepted with probability ``exp((r - max r) / beta)`` until ``--rso-samples`` are; then first-round ranking,
  `first_round_pairs`: accepted samples paired in acceptance order, (a0, a1), (a2, a3), ..., the higher reward
  chosen; a tied pair is left out and counted.

Random draws (``best_random``, ``rso``) come from a NumPy generator seeded from ``(seed, prompt index)``
(`prompt_rng`), so a prompt's selection depends on nothing else: a rerun, another eval fraction or other prompts
give it the same pairs. ``--eval-fraction`` holds out prompts as `dpokit prepare` holds out rows
(`dpokit.data.pipeline.held_out_rows`).

Nothing is dropped silently: with ``--drop-unfinished`` the completions that hit the sampler's max_new_tokens are
left out (``completions_dropped: unfinished``); a prompt that then states no preference (fewer than 2 completions,
all tied, the differing ones identical) or whose pair has identical ids is counted in ``dropped`` by reason, as
prepare counts rows; RSO's tied or identical pairs in ``pairs_dropped``, and its draws and acceptances in ``rso``.

Samples made with ``dpokit sample --ref-logps`` carry each completion's reference log-prob: select then also writes
the reference cache of the data it writes (``--ref-cache``, default ``OUT-ref.h5``), the values of the completions
it keeps copied in (`dpokit.onpolicy.sampled_reference`), so no `dpokit ref-logps` pass is needed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from dpokit import __version__, log
from dpokit.artifacts import check_replaceable
from dpokit.data.formats import preference_problem
from dpokit.data.pipeline import (
    SplitResult,
    check_output_dir,
    check_output_writable,
    counts,
    held_out_rows,
    length_stats,
    lengths,
    no_rows_kept_message,
    shape_stats,
    split_manifest,
    stored_columns,
)
from dpokit.data.prepared import SplitWriter, load_prepared, write_prepared_with
from dpokit.data.tokenize import TokenizedPair, TokenizedRanked
from dpokit.errors import DpokitError
from dpokit.metrics import column_table
from dpokit.onpolicy.sampled_reference import SelectedReference, write_selected_cache
from dpokit.onpolicy.score import PASSED_ON, JsonlFolder, folder_records, read_scored

RULES = ("best_worst", "best_random", "all", "rso")
SOURCE_KEYS = ("samples", "scorer", "reward_model", "function")  # what the scored folder records of its inputs


@dataclass
class SelectOptions:
    """The arguments of `dpokit select`."""

    scored: str
    out: str
    rule: str = "best_worst"
    eval_fraction: float = 0.0
    seed: int = 42
    rso_beta: float = 0.5
    rso_samples: int = 4
    drop_unfinished: bool = False
    ref_cache: Optional[str] = None  # where samples with --ref-logps put their cache; None: `default_ref_cache`
    overwrite: bool = False  # the prepared output and the reference cache

    @property
    def shape(self) -> str:
        return "ranked" if self.rule == "all" else "pairs"


# ----------------------------------------------------------------------------------------------
# the rules


def prompt_rng(seed: int, index: int) -> np.random.Generator:
    """The random draws of prompt `index`: a generator seeded from ``(seed, index)`` alone."""
    return np.random.default_rng([seed, index])


def best_worst(scores: Sequence[float]) -> tuple[int, int]:
    """(chosen, rejected) positions: the first highest score against the first lowest."""
    return int(np.argmax(scores)), int(np.argmin(scores))


def best_random(scores: Sequence[float], rng: np.random.Generator) -> tuple[int, int]:
    """(chosen, rejected) positions: the first highest score against one drawn uniformly from those strictly lower
    (some must be)."""
    best = int(np.argmax(scores))
    lower = [position for position, score in enumerate(scores) if score < scores[best]]
    return best, lower[int(rng.integers(len(lower)))]


def rso_accept(
    rewards: Sequence[float], num_samples: int, beta: float, uniform: Callable[[], float]
) -> tuple[list[int], int]:
    """RSO's statistical rejection sampling (Liu et al. 2023, appendix A.1, Algorithm 1): the positions of
    `num_samples` accepted candidates in acceptance order, and the number of uniforms drawn.

    Rounds until `num_samples` are accepted: ``max_reward`` is the highest reward among the remaining candidates;
    each remaining candidate in order draws ``u = uniform()`` and is accepted (and removed) if
    ``u < exp((r - max_reward) / beta)``, the round stopping as soon as `num_samples` are. A round's best candidate
    is accepted whenever it is reached (``exp(0) = 1 > u``), so each round accepts at least one.
    """
    if not 1 <= num_samples <= len(rewards):
        raise DpokitError(f"RSO: cannot accept {num_samples} of {len(rewards)} candidates")
    remaining = list(range(len(rewards)))
    accepted: list[int] = []
    draws = 0
    while len(accepted) < num_samples:
        max_reward = max(rewards[c] for c in remaining)
        for candidate in remaining:
            draws += 1
            if uniform() < math.exp((rewards[candidate] - max_reward) / beta):
                accepted.append(candidate)
                if len(accepted) == num_samples:
                    break
        remaining = [c for c in remaining if c not in accepted]
    return accepted, draws


def first_round_pairs(accepted: Sequence[int], rewards: Sequence[float]) -> tuple[list[tuple[int, int]], list[int]]:
    """RSO's first-round ranking: accepted samples paired in acceptance order, (a0, a1), (a2, a3), ..., as
    (chosen, rejected) with the higher reward chosen (an odd last one is left unpaired); and the pairs' numbers
    (0, 1, ...) that tie, which are left out."""
    pairs, tied = [], []
    for number, (a, b) in enumerate(zip(accepted[0::2], accepted[1::2])):
        if rewards[a] == rewards[b]:
            tied.append(number)
        else:
            pairs.append((a, b) if rewards[a] > rewards[b] else (b, a))
    return pairs, tied


@dataclass
class Selection:
    """What the rule made of one prompt: its rows, or the reason it has none, and what was left out on the way."""

    rows: list[TokenizedPair | TokenizedRanked] = field(default_factory=list)
    sources: list[tuple[int, ...]] = field(default_factory=list)  # per row, its completions' places in the record
    dropped: Optional[tuple[str, str]] = None  # (reason, detail): the prompt gave no row
    completions_dropped: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail) each
    pairs_dropped: list[tuple[str, str]] = field(default_factory=list)  # RSO: (reason, detail) each
    draws: int = 0  # RSO: uniforms drawn
    accepted: int = 0  # RSO: candidates accepted


def select_prompt(record: dict[str, Any], options: SelectOptions) -> Selection:
    """Apply `options.rule` to one scored record (`dpokit.onpolicy.score.folder_records`)."""
    selection = Selection()
    k = len(record["scores"])
    keep = list(range(k))
    if options.drop_unfinished:
        keep = [j for j in keep if record["finished"][j]]
        selection.completions_dropped = [
            ("unfinished", f"completion {j} reached max_new_tokens") for j in range(k) if not record["finished"][j]
        ]
    ids = [record["completion_ids"][j] for j in keep]
    scores = [float(record["scores"][j]) for j in keep]
    problem = preference_problem(ids, scores, total=k)
    if problem is not None:
        selection.dropped = problem
        return selection
    prompt_ids = record["prompt_ids"]
    if options.rule == "all":
        selection.rows = [TokenizedRanked(prompt_ids=prompt_ids, completion_ids=ids, scores=scores)]
        selection.sources = [tuple(keep)]
        return selection
    if options.rule != "rso":
        if options.rule == "best_worst":
            chosen, rejected = best_worst(scores)
        else:
            chosen, rejected = best_random(scores, prompt_rng(options.seed, record["index"]))
        if ids[chosen] == ids[rejected]:
            detail = f"completions {keep[chosen]} and {keep[rejected]} have the same ids"
            selection.dropped = ("identical_chosen_rejected", detail)
        else:
            selection.rows = [TokenizedPair(prompt_ids=prompt_ids, chosen_ids=ids[chosen], rejected_ids=ids[rejected])]
            selection.sources = [(keep[chosen], keep[rejected])]
        return selection
    uniform = prompt_rng(options.seed, record["index"]).random
    accepted, selection.draws = rso_accept(scores, min(options.rso_samples, len(scores)), options.rso_beta, uniform)
    selection.accepted = len(accepted)
    pairs, tied = first_round_pairs(accepted, scores)
    for number in tied:
        a, b = keep[accepted[2 * number]], keep[accepted[2 * number + 1]]
        selection.pairs_dropped.append(
            ("tied_pair", f"completions {a} and {b} both score {scores[accepted[2 * number]]:g}")
        )
    for chosen, rejected in pairs:
        if ids[chosen] == ids[rejected]:
            detail = f"completions {keep[chosen]} and {keep[rejected]} have the same ids"
            selection.pairs_dropped.append(("identical_pair", detail))
        else:
            selection.rows.append(
                TokenizedPair(prompt_ids=prompt_ids, chosen_ids=ids[chosen], rejected_ids=ids[rejected])
            )
            selection.sources.append((keep[chosen], keep[rejected]))
    if not selection.rows:
        detail = f"the {len(accepted)} accepted completions make no pair of different scores and ids"
        selection.dropped = ("no_rso_pair", detail)
    return selection


# ----------------------------------------------------------------------------------------------
# counts


@dataclass
class Tally:
    """What selection did with one split's prompts (or all of them): prepare's counts (`SplitResult`: prompts read,
    rows kept, prompts dropped by reason, completions left out, lengths), the pairs left out, RSO's draws."""

    result: SplitResult
    pairs_dropped: Counter = field(default_factory=Counter)
    first_pair_dropped: dict[str, str] = field(default_factory=dict)
    draws: int = 0
    accepted: int = 0

    def add(self, selection: Selection, location: str) -> None:
        self.result.read += 1
        self.result.drop_completions(selection.completions_dropped, location)
        for reason, detail in selection.pairs_dropped:
            self.pairs_dropped[reason] += 1
            self.first_pair_dropped.setdefault(reason, f"{location}: {detail}")
        self.draws += selection.draws
        self.accepted += selection.accepted
        if selection.dropped is not None:
            self.result.drop(selection.dropped[0], location, selection.dropped[1])
        for row in selection.rows:
            self.result.keep(row)

    def manifest_counts(self, rule: str) -> dict[str, Any]:
        """`dpokit.data.pipeline.counts` (prompts read as ``read``, rows written as ``kept``), with the completions
        left out for pairs too, and RSO's pairs left out and acceptance."""
        entry = counts(self.result)
        entry.setdefault("completions_dropped", dict(sorted(self.result.completions_dropped.items())))
        entry.setdefault("first_completion_dropped", dict(sorted(self.result.first_completion_dropped.items())))
        if rule == "rso":
            entry["pairs_dropped"] = dict(sorted(self.pairs_dropped.items()))
            entry["first_pair_dropped"] = dict(sorted(self.first_pair_dropped.items()))
            entry["rso"] = self.acceptance()
        return entry

    def acceptance(self) -> dict[str, Any]:
        rate = self.accepted / self.draws if self.draws else 0.0
        return {"draws": self.draws, "accepted": self.accepted, "acceptance_rate": round(rate, 6)}


# ----------------------------------------------------------------------------------------------
# the command


def check_select_options(options: SelectOptions) -> None:
    """Refuse bad option values and an output directory that must not be replaced, before any work."""
    if options.rule not in RULES:
        raise DpokitError(f"--rule {options.rule!r} is not one of {', '.join(RULES)}")
    if not 0.0 <= options.eval_fraction < 1.0:
        raise DpokitError(f"--eval-fraction {options.eval_fraction} must be at least 0 and below 1")
    if options.seed < 0:
        raise DpokitError(f"--seed {options.seed} must be 0 or more")
    if options.rule == "rso":
        if not (math.isfinite(options.rso_beta) and options.rso_beta > 0):
            raise DpokitError(f"--rso-beta {options.rso_beta} must be a positive number")
        if options.rso_samples < 2 or options.rso_samples % 2:
            raise DpokitError(
                f"--rso-samples {options.rso_samples} must be an even number of at least 2: accepted samples are "
                "paired two by two"
            )
    check_output_dir(Path(options.out), options.overwrite, (options.scored,))
    check_output_writable(Path(options.out))


def eval_prompts(count: int, fraction: float, seed: int) -> Optional[np.ndarray]:
    """Which prompts go to the eval split (`held_out_rows`, as prepare holds out rows), or None for no eval split."""
    if not fraction:
        return None
    size = round(count * fraction)
    if size == 0 or size == count:
        raise DpokitError(
            f"--eval-fraction {fraction} of {count} prompts leaves {'no eval' if size == 0 else 'no train'} prompts; "
            "change the fraction, or leave it out for a train split alone"
        )
    return held_out_rows(count, fraction, seed)


def no_rows_message(split: str, result: SplitResult) -> str:
    """Why a split has no rows (prepare's message), and what to change when --drop-unfinished left completions out."""
    message = no_rows_kept_message(split, result)
    unfinished = result.completions_dropped["unfinished"]
    if unfinished:
        message += (
            f"; --drop-unfinished left out {unfinished} unfinished completions: select without it, or sample with a "
            "larger --max-new-tokens"
        )
    return message


def tokenizer_record(scored: JsonlFolder) -> dict[str, str]:
    """The samples' tokenizer (name and fingerprint), which the prepared manifest records."""
    tokenizer = scored.manifest.get("tokenizer")
    if not (isinstance(tokenizer, dict) and tokenizer.get("name") and tokenizer.get("fingerprint")):
        raise DpokitError(
            f"{scored.path}/manifest.json records no tokenizer name and fingerprint (from the samples' manifest); "
            "score the samples again with this dpokit"
        )
    return {"name": tokenizer["name"], "fingerprint": tokenizer["fingerprint"]}


def default_ref_cache(out: str | Path) -> Path:
    """``prepared-ref.h5`` next to ``prepared/``: where the reference cache goes without ``--ref-cache``."""
    path = Path(out)
    return path.with_name(f"{path.name}-ref.h5")


def ref_cache_target(options: SelectOptions, scored: JsonlFolder) -> Optional[Path]:
    """The reference cache to write (None when the samples carry no reference values), checked before any work:
    ``--ref-cache`` needs samples made with ``--ref-logps``, and an existing cache is replaced only with
    ``--overwrite``."""
    if not scored.manifest.get("ref_logps"):
        if options.ref_cache:
            raise DpokitError(
                f"--ref-cache {options.ref_cache}: the records of {scored.path} carry no reference log-probs; sample "
                "with --ref-logps (when the sampling model is the reference), or leave --ref-cache out and run "
                f"`dpokit ref-logps {options.out} --model MODEL --out {options.ref_cache}`"
            )
        return None
    path = Path(options.ref_cache) if options.ref_cache else default_ref_cache(options.out)
    out = Path(options.out).resolve()
    if path.resolve() == out or out in path.resolve().parents:
        raise DpokitError(f"--ref-cache {path} lies in --out {options.out}; choose a path outside it")
    if path.is_dir():
        raise DpokitError(f"--ref-cache {path} is a directory; the reference cache is one file, e.g. {path / 'ref.h5'}")
    check_replaceable(path, "cache", options.overwrite, inputs=(options.scored,), option="--ref-cache")
    return path


def run_select(options: SelectOptions, console: Optional[Console] = None) -> Path:
    """Select pairs or ranked groups from `options.scored` into the prepared directory `options.out` (and, from
    samples that carry their reference log-probs, its reference cache: `ref_cache_target`)."""
    console = console or log.console()
    started = time.perf_counter()
    check_select_options(options)
    scored = read_scored(options.scored)
    tokenizer = tokenizer_record(scored)
    cache_path = ref_cache_target(options, scored)
    held_out = eval_prompts(scored.num_prompts, options.eval_fraction, options.seed)
    names = ["train"] if held_out is None else ["train", "eval"]
    source = str(scored.path.resolve())
    tallies = {name: Tally(SplitResult(source=source, shape=options.shape)) for name in names}
    total = Tally(SplitResult(source=source, shape=options.shape))
    references = {name: SelectedReference(ranked=options.shape == "ranked") for name in names} if cache_path else None

    def write_splits(tmp: Path) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:
            writers = {name: stack.enter_context(SplitWriter(tmp / name, options.shape)) for name in names}
            for record in folder_records(scored, scored=True):
                name = "eval" if held_out is not None and held_out[record["index"]] else "train"
                selection = select_prompt(record, options)
                location = f"prompt {record['index']}"
                for tally in (tallies[name], total):
                    tally.add(selection, location)
                for row, places in zip(selection.rows, selection.sources):
                    writers[name].add(*stored_columns(row))
                    if references is not None:
                        references[name].add(record, places)
            for name, writer in writers.items():
                if tallies[name].result.kept == 0:
                    raise DpokitError(no_rows_message(name, tallies[name].result))
                writer.finish()
        return select_manifest(options, scored, tokenizer, tallies, total, cache_path)

    out = write_prepared_with(options.out, write_splits, overwrite=options.overwrite)
    if cache_path is not None:
        sampled_from = str(scored.manifest.get("samples") or scored.path.resolve())
        write_selected_cache(cache_path, scored.manifest["ref_logps"], load_prepared(out), references, sampled_from)
    console.print(summary_table(options, tallies, out, time.perf_counter() - started))
    if cache_path is not None:
        console.print(
            f"reference cache → {cache_path} (the sampler's log-probs: no `dpokit ref-logps` pass needed)",
            soft_wrap=True,
        )
    return out


def select_manifest(
    options: SelectOptions,
    scored: JsonlFolder,
    tokenizer: dict[str, str],
    tallies: dict[str, Tally],
    total: Tally,
    cache_path: Optional[Path] = None,
) -> dict[str, Any]:
    """What `write_prepared_with` records besides the format version, data fingerprint and file digests: prepare's
    manifest fields, and the selection as ``source`` (with ``ref_cache``, the reference cache written with it)."""
    source = {
        "scored": str(scored.path.resolve()),
        "rule": options.rule,
        "seed": options.seed,
        "eval_fraction": options.eval_fraction,
        "drop_unfinished": options.drop_unfinished,
        **({"rso_beta": options.rso_beta, "rso_samples": options.rso_samples} if options.rule == "rso" else {}),
        **{key: scored.manifest[key] for key in SOURCE_KEYS if scored.manifest.get(key) is not None},
        **({"ref_cache": str(cache_path.resolve())} if cache_path is not None else {}),
    }
    # prepare's names: `chat_template` is the template's text (null: none), `separator` the plain prompts' separator
    rendering = {name: scored.manifest[key] for name, key in zip(("chat_template", "separator"), PASSED_ON)
                 if key in scored.manifest}  # fmt: skip
    return {
        "shape": options.shape,
        "source": source,
        "splits": {
            name: {**split_manifest(tally.result), **tally.manifest_counts(options.rule)}
            for name, tally in tallies.items()
        },
        "counts": total.manifest_counts(options.rule),
        "lengths": lengths(total.result),
        **shape_stats(total.result),
        "tokenizer": tokenizer,
        **rendering,
        "eval_fraction": options.eval_fraction,
        "seed": options.seed,
        "dpokit_version": __version__,
    }


def summary_table(options: SelectOptions, tallies: dict[str, Tally], out: Path, seconds: float) -> Table:
    """Prompts read, rows written, what was dropped by reason, RSO's acceptance and the token lengths, one column a
    split."""
    read = sum(t.result.read for t in tallies.values())
    table = column_table(f"dpokit select → {out}", f"{read:,} prompts, rule {options.rule}, {seconds:.1f} s", tallies)

    def row(label: str, value) -> None:
        table.add_row(label, *(str(value(t)) for t in tallies.values()))

    row("prompts read", lambda t: t.result.read)
    row("groups written" if options.rule == "all" else "pairs written", lambda t: t.result.kept)
    for reason in sorted(set().union(*(t.result.dropped for t in tallies.values()))):
        row(f"prompts dropped: {reason}", lambda t, reason=reason: t.result.dropped[reason])
    for reason in sorted(set().union(*(t.result.completions_dropped for t in tallies.values()))):
        row(f"completions dropped: {reason}", lambda t, reason=reason: t.result.completions_dropped[reason])
    for reason in sorted(set().union(*(t.pairs_dropped for t in tallies.values()))):
        row(f"pairs dropped: {reason}", lambda t, reason=reason: t.pairs_dropped[reason])
    if options.rule == "rso":
        row("RSO draws / accepted", lambda t: f"{t.draws:,} / {t.accepted:,}")
        row("RSO acceptance rate", lambda t: f"{t.acceptance()['acceptance_rate']:.3f}")
    for label in ("prompt", "completion"):
        row(
            f"{label} tokens p50/p90/p99/max",
            lambda t, label=label: "/".join(map(str, length_stats(getattr(t.result, f"{label}_lengths")).values())),
        )
    return table
