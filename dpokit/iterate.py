"""`dpokit iterate`: rounds of on-policy DPO, each in ``OUT/round_N/``:

1. ``samples/``  `dpokit sample`: k completions per prompt from the round's policy (round 1: ``--model``);
2. ``scored/``   `dpokit score`: the reward model's (or ``--scorer``'s) score of each completion;
3. ``prepared/`` `dpokit select`: pairs or ranked groups by ``--rule`` (RSO's rejection sampling included);
4. ``ref.h5``    the reference's log-probs: written by the sampling pass when the sampler is the reference
                 (``--reference previous``, or round 1), else by `dpokit ref-logps` with the fixed reference;
5. ``run/``      `dpokit train --config CONFIG` from the round's policy;
6. ``policy/``   `dpokit export` of the run: the next round's policy (LoRA merged into its base).

After the last round the final policy is sampled and scored once more (``round_{R+1}/samples``, ``scored``), so
the table shows the reward of every policy the loop made. Every stage is resumable: run the same command again
and each finished stage is kept, an unfinished one continues (sampling, scoring, the reference pass and
training resume where they stopped). ``iterate.json`` holds the settings and one summary per round; the table
and ``rewards.png`` show the mean and spread of the sampled completions' rewards, RSO's acceptance rate and the
training metrics per round.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from dpokit import __version__, log
from dpokit.artifacts import (
    check_replaceable,
    is_dpokit_artifact,
    replace_atomically,
    replace_within,
    write_marker,
    write_text_within,
)
from dpokit.errors import DpokitError

KIND = "iterate"
STATE_FILE = "iterate.json"
PLOT_FILE = "rewards.png"
REFERENCES = ("previous", "fixed")
SETTINGS = (  # what a resumed iterate must share with the run it continues
    "prompts",
    "model",
    "config",
    "reward_model",
    "scorer",
    "k",
    "rule",
    "rso_beta",
    "rso_samples",
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "reference",
    "eval_fraction",
    "overrides",
)


@dataclass
class IterateOptions:
    """The arguments of `dpokit iterate`."""

    prompts: str
    model: str
    out: Path
    config: str
    rounds: int = 2
    reward_model: Optional[str] = None
    scorer: Optional[str] = None
    k: int = 4
    rule: str = "best_worst"
    rso_beta: float = 0.5
    rso_samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    sample_batch_size: int = 8
    seed: int = 0
    reference: str = "previous"  # previous: each round's reference is its starting policy; fixed: always --model
    eval_fraction: float = 0.0
    split: Optional[str] = None  # the prompts' split (None: what `dpokit sample` reads by default)
    gpus: int = 1
    overrides: list[str] = field(default_factory=list)  # `dpokit train` overrides (key=value) for every round
    overwrite: bool = False


@dataclass
class IterateResult:
    out: Path
    rounds: list[dict[str, Any]]  # one summary per round, and the final policy's rewards last
    plot: Optional[Path]
    seconds: float


def run_iterate(options: IterateOptions, console: Optional[Console] = None, own_process: bool = False) -> IterateResult:
    """Every round of `options` (the finished ones kept), then the final policy's rewards; prints the table."""
    console = console or log.console()
    check_options(options)
    out = Path(options.out)
    started = time.perf_counter()
    state = open_folder(out, options)
    policy = Path(options.model)
    for number in range(1, options.rounds + 1):
        recorded = next((r for r in state["rounds"] if r["round"] == number), None)
        if recorded is not None and is_dpokit_artifact(round_folder(out, number) / "policy", "export"):
            policy = round_folder(out, number) / "policy"  # a finished round: its summary is written last
            continue
        console.rule(f"[bold]round {number}/{options.rounds}")
        summary, policy = run_round(number, policy, options, console, own_process)
        state["rounds"] = [r for r in state["rounds"] if r["round"] != number] + [summary]
        write_state(out, state)
    console.rule("[bold]the final policy's rewards")
    final = sample_and_score(options.rounds + 1, policy, options, sampler_cache=False)
    state["final"] = final
    write_state(out, state)
    rows = state["rounds"] + [final]
    plot = draw_rewards(out, rows)
    console.print(rounds_table(rows))
    return IterateResult(out=out, rounds=rows, plot=plot, seconds=time.perf_counter() - started)


def check_options(options: IterateOptions) -> None:
    """Refuse settings that cannot run, before any work."""
    if options.rounds < 1:
        raise DpokitError(f"--rounds {options.rounds}: give 1 or more")
    if options.reference not in REFERENCES:
        raise DpokitError(f"--reference {options.reference!r}: choose {' or '.join(REFERENCES)}")
    if (options.reward_model is None) == (options.scorer is None):
        raise DpokitError("give one of --reward-model RM or --scorer pkg.module:function to score the samples")
    for override in options.overrides:
        key = override.split("=", 1)[0]
        if key in ("data.path", "model.path", "reference.cache", "reference.model", "output.dir"):
            raise DpokitError(f"{override}: dpokit iterate sets {key} for each round; remove it")


def open_folder(out: Path, options: IterateOptions) -> dict[str, Any]:
    """The state of `out`: a new one (the folder made and marked), or the one a resumed run left, checked to have
    the same settings."""
    settings = {key: getattr(options, key) for key in SETTINGS}
    settings["prompts"], settings["model"] = str(options.prompts), str(options.model)
    state_path = out / STATE_FILE
    if out.exists() and not options.overwrite and is_dpokit_artifact(out, KIND) and state_path.is_file():
        state = json.loads(state_path.read_text())
        differing = [key for key in SETTINGS if state["settings"].get(key) != settings[key]]
        if differing:
            key = differing[0]
            raise DpokitError(
                f"{out} holds an iterate run with {key}={state['settings'].get(key)!r}, not {settings[key]!r}; "
                "run it with its own settings to continue, or pass --overwrite to start again"
            )
        log.note(f"continuing {out}: {len(state['rounds'])} round(s) recorded")
        return state
    check_replaceable(out, KIND, options.overwrite)
    replace_atomically(out, KIND, lambda tmp: tmp.mkdir())  # an old iterate folder (--overwrite) goes whole
    write_marker(out, KIND)  # no entry list: the folder fills round by round
    state = {"dpokit_version": __version__, "settings": settings, "rounds": [], "final": None}
    write_state(out, state)
    return state


def write_state(out: Path, state: dict[str, Any]) -> None:
    write_text_within(out, KIND, out / STATE_FILE, json.dumps(state, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# One round


def run_round(
    number: int, policy: Path, options: IterateOptions, console: Console, own_process: bool
) -> tuple[dict[str, Any], Path]:
    """Sample, score, select, reference, train and export round `number` from `policy`; returns its summary and
    the next round's policy."""
    from dpokit.onpolicy.select import SelectOptions, run_select
    from dpokit.reference.compute import RefLogpsOptions, run_ref_logps

    folder = round_folder(options.out, number)
    reference = Path(options.model) if options.reference == "fixed" else policy
    sampler_is_reference = reference == policy
    summary = sample_and_score(number, policy, options, sampler_cache=sampler_is_reference)
    prepared, cache = folder / "prepared", folder / "ref.h5"
    if not is_dpokit_artifact(prepared, "prepared"):
        run_select(
            SelectOptions(
                scored=str(folder / "scored"),
                out=str(prepared),
                rule=options.rule,
                eval_fraction=options.eval_fraction,
                seed=options.seed + number,
                rso_beta=options.rso_beta,
                rso_samples=options.rso_samples,
                ref_cache=str(cache) if sampler_is_reference else None,
                overwrite=True,  # an unfinished round's leftovers: this folder is iterate's own
            ),
            console,
        )
    if not sampler_is_reference:
        run_ref_logps(RefLogpsOptions(prepared=str(prepared), model=str(reference), out=str(cache), gpus=options.gpus))

    trained = train_round(folder, policy, reference, prepared, cache, options, own_process)
    next_policy = export_policy(folder, trained, policy)
    summary.update(
        selected=selection_counts(prepared),
        train={key: trained.train.get(key) for key in ("loss", "rewards/accuracies", "rewards/margins")},
        eval={key: trained.eval.get(key) for key in ("loss", "rewards/accuracies", "rewards/margins")},
        steps=trained.steps,
        reference=str(reference),
    )
    return summary, next_policy


def round_folder(out: Path, number: int) -> Path:
    return Path(out) / f"round_{number}"


def sample_and_score(number: int, policy: Path, options: IterateOptions, sampler_cache: bool) -> dict[str, Any]:
    """Round `number`'s samples from `policy` and their scores (each resumed or kept when already there); the
    rewards' summary. With `sampler_cache` the sampling pass also computes the reference log-probs."""
    from dpokit.onpolicy.sample import SampleOptions, run_sample
    from dpokit.onpolicy.score import ScoreOptions, run_score

    folder = round_folder(options.out, number)
    run_sample(
        SampleOptions(
            prompts=options.prompts,
            model=str(policy),
            out=folder / "samples",
            k=options.k,
            temperature=options.temperature,
            top_p=options.top_p,
            max_new_tokens=options.max_new_tokens,
            batch_size=options.sample_batch_size,
            seed=options.seed + number,
            gpus=options.gpus,
            split=options.split,
            ref_logps=sampler_cache,
        )
    )
    run_score(
        ScoreOptions(
            samples=str(folder / "samples"),
            out=str(folder / "scored"),
            reward_model=options.reward_model,
            scorer=options.scorer,
            gpus=options.gpus,
        )
    )
    scored = json.loads((folder / "scored" / "manifest.json").read_text())
    return {"round": number, "policy": str(policy), "reward": scored["scores"]}


def train_round(
    folder: Path, policy: Path, reference: Path, prepared: Path, cache: Path, options: IterateOptions, own_process
):
    """`dpokit train --config CONFIG` on the round's data from `policy` (resumed when its run is there)."""
    from dpokit.launch import run_recipe

    run_dir = folder / "run"
    argv = [
        "--config",
        options.config,
        f"data.path={prepared}",
        f"model.path={policy}",
        f"reference.cache={cache}",
        f"output.dir={run_dir}",
        *([f"reference.model={reference}"] if reference != policy else []),
        *options.overrides,
    ]
    if is_dpokit_artifact(run_dir, "run"):
        argv.append("output.resume=true")
    return run_recipe(None, argv, gpus=options.gpus, own_process=own_process)


def export_policy(folder: Path, trained, policy: Path) -> Path:
    """The run's final model as a full checkpoint (a LoRA merged into `policy`): the next round's policy."""
    from dpokit.export import export_run

    out = folder / "policy"
    if not is_dpokit_artifact(out, "export"):
        if trained.checkpoint is None:
            raise DpokitError(f"{folder / 'run'} saved no checkpoint; the round has no policy to export")
        export_run(trained.checkpoint, out, base_model=str(policy), overwrite=True)
    return out


def selection_counts(prepared: Path) -> dict[str, Any]:
    """What `dpokit select` kept and RSO's acceptance, from the prepared manifest."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    counts = manifest.get("counts", {})
    rso = counts.get("rso") or {}
    return {"rows": sum(split.get("rows", 0) for split in manifest.get("splits", {}).values()), "rso": rso}


# ---------------------------------------------------------------------------------------------
# Output


def rounds_table(rows: list[dict[str, Any]]) -> Table:
    """One row per round (and the final policy): rewards of its samples, what was selected, training metrics."""
    table = Table(title="dpokit iterate")
    for column in ("round", "reward mean ± std", "min / max", "pairs", "RSO acceptance", "train loss", "eval acc"):
        table.add_column(column, justify="right")
    for row in rows:
        reward, selected = row["reward"], row.get("selected", {})
        rso = selected.get("rso") or {}
        table.add_row(
            str(row["round"]) if "train" in row else f"{row['round']} (final)",
            f"{reward['mean']:.3f} ± {reward['std']:.3f}",
            f"{reward['min']:.3f} / {reward['max']:.3f}",
            str(selected.get("rows", "")),
            f"{rso['acceptance_rate']:.1%}" if rso.get("acceptance_rate") is not None else "",
            number(row.get("train", {}).get("loss")),
            number(row.get("eval", {}).get("rewards/accuracies")),
        )
    return table


def number(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4g}"


def draw_rewards(out: Path, rows: list[dict[str, Any]]) -> Optional[Path]:
    """``rewards.png``: the mean reward of each policy's samples, with its spread; None without matplotlib."""
    from dpokit.metrics import pyplot

    try:
        plt = pyplot("drawing the rewards per round")
    except DpokitError as exc:
        log.note(f"no plot: {exc}")
        return None
    rounds = [row["round"] for row in rows]
    means = [row["reward"]["mean"] for row in rows]
    spreads = [row["reward"]["std"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(rounds, means, yerr=spreads, marker="o", capsize=4)
    ax.set(xlabel="round (the last: the final policy)", ylabel="reward of sampled completions", title="dpokit iterate")
    fig.tight_layout()
    replace_within(out, KIND, out / PLOT_FILE, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out / PLOT_FILE
