"""Training metrics: per-pair (or per-group) sums reduced across ranks, JSONL/TensorBoard logging, progress, plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dpokit.artifacts import check_replaceable, is_dpokit_artifact, replace_within, write_marker, write_text_within
from dpokit.errors import DpokitError
from dpokit.types import ChosenRejectedOutputs, RankedOutputs, unpaired_outputs

METRICS_FILE = "metrics.jsonl"
PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


class MetricSums:
    """Sums over micro-batches kept on the device in one float64 tensor (``sums``: a subclass's values, then the
    MoE load-balancing term's example-weighted sum, the micro-batches with it, examples, tokens), and a weighted
    combination's terms by name; `all_reduce` sums them over ranks."""

    def __init__(self, size: int, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(size + 4, dtype=torch.float64, device=device)
        self.term_sums: dict[str, torch.Tensor] = {}  # a weighted combination's terms, by name

    def _add(self, values: torch.Tensor, router_aux_loss, examples: int, num_tokens: int, terms) -> None:
        """Add the subclass's `values` (float64, on the device) and the shared tail; no host sync."""
        extra = torch.tensor(
            [0.0, float(router_aux_loss is not None), float(examples), float(num_tokens)],
            dtype=torch.float64,
            device=values.device,
        )
        if router_aux_loss is not None:  # kept on the device: no host sync in the step
            extra[0] = router_aux_loss.detach().double() * examples
        self.sums += torch.cat([values, extra]).to(self.sums.device)
        for name, term in (terms or {}).items():
            total = term.detach().double().sum().to(self.sums.device)
            self.term_sums[name] = self.term_sums[name] + total if name in self.term_sums else total

    def all_reduce(self, extra: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Sum over ranks (a no-op in a single process); `extra` values are summed in the same call and returned."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if extra is not None:
                joined = torch.cat([self.sums, extra.to(self.sums)])
                torch.distributed.all_reduce(joined)
                self.sums, extra = joined[: self.sums.numel()], joined[self.sums.numel() :]
            else:
                torch.distributed.all_reduce(self.sums)
            if self.term_sums:  # every rank has the same terms, in the same order
                stacked = torch.stack(list(self.term_sums.values()))
                torch.distributed.all_reduce(stacked)
                self.term_sums = dict(zip(self.term_sums, stacked))
        return extra

    @property
    def num_pairs(self) -> int:
        """Examples: pairs, or ranked groups."""
        return int(self.sums[-2])

    @property
    def num_tokens(self) -> int:
        return int(self.sums[-1])

    def _shared_means(self) -> dict[str, float]:
        """The MoE term and a combination's terms, per example."""
        examples = max(self.num_pairs, 1)
        means = {}
        if self.sums[-3] > 0:  # a mixture-of-experts policy's load-balancing term (already times its coefficient)
            means["router_aux_loss"] = float(self.sums[-4]) / examples
        means.update({f"loss/{name}": float(total) / examples for name, total in self.term_sums.items()})
        return means


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum of `values` where `mask` holds, and how many: a metric's total and count."""
    return torch.where(mask, values, 0.0).sum(), mask.sum().double()


class PairMetrics(MetricSums):
    """Sums of per-pair values over micro-batches (and, after `all_reduce`, over ranks); `means()` divides."""

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__(len(PAIR_METRICS), device)

    def add(
        self,
        losses,
        chosen_rewards,
        rejected_rewards,
        policy: ChosenRejectedOutputs,
        num_tokens: int,
        terms: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        values = [
            losses,
            chosen_rewards,
            rejected_rewards,
            (chosen_rewards > rejected_rewards).float(),
            chosen_rewards - rejected_rewards,
            policy.chosen_logps,
            policy.rejected_logps,
            policy.chosen_logits if policy.chosen_logits is not None else torch.zeros_like(losses),
            policy.rejected_logits if policy.rejected_logits is not None else torch.zeros_like(losses),
        ]
        sums = torch.stack([v.detach().double().sum() for v in values])
        self._add(sums, policy.router_aux_loss, losses.numel(), num_tokens, terms)

    def means(self) -> dict[str, float]:
        pairs = max(self.num_pairs, 1)
        means = {name: float(self.sums[i]) / pairs for i, name in enumerate(PAIR_METRICS)}
        means.update(self._shared_means())
        return means


class CountedMetrics(MetricSums):
    """Metrics each divided by its own count (`NAMES`; 0 where nothing counted): `sums` holds every total, then
    every count."""

    NAMES: tuple[str, ...] = ()

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__(2 * len(self.NAMES), device)

    def _add_counted(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]], router_aux_loss, examples, num_tokens, terms
    ):
        """Add each metric's ``(total, count)`` in `NAMES` order; no host sync."""
        values = torch.stack([total for total, _ in pairs] + [count for _, count in pairs])
        self._add(values, router_aux_loss, examples, num_tokens, terms)

    def counted_means(self) -> tuple[dict[str, float], list[float]]:
        """Each metric's mean, and the counts."""
        n = len(self.NAMES)
        totals, counts = self.sums[:n].tolist(), self.sums[n : 2 * n].tolist()
        return {name: total / count if count else 0.0 for name, total, count in zip(self.NAMES, totals, counts)}, counts


RANK_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/ranking_accuracy",
    "rewards/ndcg",
    "rewards/best",
    "rewards/worst",
    "logps/best",
    "logps/worst",
    "logits/best",
    "logits/worst",
)


class RankMetrics(CountedMetrics):
    """Sums over micro-batches of ranked groups (and, after `all_reduce`, over ranks); `means()` divides each by
    its own count (0 where nothing counted). "Best" and "worst" are each group's first highest- and first
    lowest-scored completion; a NaN reward (a completion no pair used) is left out of every reward metric.

    - ``loss``: per group; ``rewards/margins``: reward of the best minus the worst, per group;
    - ``rewards/accuracies``: over every pair of a group with different scores and both rewards known, the
      fraction whose rewards are strictly in the scores' order (0 at step 1, as for pairs);
    - ``rewards/ranking_accuracy``: the fraction of groups (with such a pair) whose every such pair is in order;
    - ``rewards/ndcg``: NDCG of the completions sorted by reward (equal rewards: the lower score first, so at
      step 1 it is the worst order's), gains ``2^s' - 1`` with ``s'`` the scores min-max normalised to [0, 1]
      in each group (raw ``2^s`` overflows, and negative scores would give negative gains), discount
      ``log2(1 + position)``; groups whose known scores all tie are left out;
    - ``rewards/best|worst``, ``logps/best|worst``, ``logits/best|worst``: per group.
    """

    NAMES = RANK_METRICS

    def add(
        self,
        losses: torch.Tensor,
        rewards: torch.Tensor,
        policy: RankedOutputs,
        num_tokens: int,
        terms: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        if policy.scores is None:
            raise DpokitError("RankMetrics needs each completion's score: the policy's RankedOutputs has scores=None")
        num_groups, device = policy.num_groups, rewards.device
        r, real = policy.padded(rewards.detach().double(), fill=float("nan"))  # [G, K]
        s, _ = policy.padded(policy.scores.detach().to(device, torch.float64), fill=float("nan"))
        logps, _ = policy.padded(policy.logps.detach().double().to(device))
        logits = policy.mean_logits if policy.mean_logits is not None else torch.zeros_like(policy.logps)
        logits, _ = policy.padded(logits.detach().double().to(device))
        known = real & ~torch.isnan(r)

        ordered = (s[:, :, None] > s[:, None, :]) & known[:, :, None] & known[:, None, :]  # [G, i, j]: i above j
        right = ordered & (r[:, :, None] > r[:, None, :])
        ordered_per_group, right_per_group = ordered.sum((1, 2)), right.sum((1, 2))
        has_pair = ordered_per_group > 0

        best = torch.where(real, s, -torch.inf).argmax(-1, keepdim=True)  # [G, 1]: the first highest-scored
        worst = torch.where(real, s, torch.inf).argmin(-1, keepdim=True)
        r_best, r_worst = r.gather(1, best).squeeze(1), r.gather(1, worst).squeeze(1)
        best_known, worst_known = known.gather(1, best).squeeze(1), known.gather(1, worst).squeeze(1)

        # NDCG of the reward order: ties in reward put the lower score first (a pessimistic order)
        low = torch.where(known, s, torch.inf).amin(-1, keepdim=True)
        span = torch.where(known, s, -torch.inf).amax(-1, keepdim=True) - low
        spread = known & (span > 0)
        gain = torch.where(spread, torch.exp2((s - low) / torch.where(spread, span, 1.0)) - 1, 0.0)  # [G, K]
        by_score = torch.sort(torch.where(known, s, torch.inf), dim=-1, stable=True).indices
        key = torch.where(known, r, -torch.inf).gather(1, by_score)
        order = by_score.gather(1, torch.sort(key, dim=-1, descending=True, stable=True).indices)
        discount = 1.0 / torch.log2(torch.arange(2, s.shape[1] + 2, device=device, dtype=torch.float64))
        dcg = (gain.gather(1, order) * discount).sum(-1)
        ideal = (torch.sort(gain, dim=-1, descending=True).values * discount).sum(-1)
        rated = ideal > 0

        every = torch.ones(num_groups, dtype=torch.bool, device=device)
        pairs = [
            (losses.detach().double().sum(), every.sum().double()),
            (right_per_group.sum().double(), ordered_per_group.sum().double()),
            masked_sum(r_best - r_worst, best_known & worst_known),
            masked_sum((right_per_group == ordered_per_group).double(), has_pair),
            masked_sum(dcg / torch.where(rated, ideal, 1.0), rated),
            masked_sum(r_best, best_known),
            masked_sum(r_worst, worst_known),
            masked_sum(logps.gather(1, best).squeeze(1), every),
            masked_sum(logps.gather(1, worst).squeeze(1), every),
            masked_sum(logits.gather(1, best).squeeze(1), every),
            masked_sum(logits.gather(1, worst).squeeze(1), every),
        ]
        self._add_counted(pairs, policy.router_aux_loss, num_groups, num_tokens, terms)

    def means(self) -> dict[str, float]:
        means, _ = self.counted_means()
        means.update(self._shared_means())
        return means


UNPAIRED_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/desirable",
    "rewards/undesirable",
    "logps/desirable",
    "logps/undesirable",
    "logits/desirable",
    "logits/undesirable",
    "kl",
    "fraction_desirable",
)


class UnpairedMetrics(CountedMetrics):
    """Sums over micro-batches of unpaired examples (and, after `all_reduce`, over ranks); `means()` divides each by
    its own count (0 where nothing counted).

    - ``loss``: per example; ``rewards/accuracies``: the fraction of examples whose reward has its label's sign
      (> 0 desirable, < 0 undesirable; 0 at step 1, as for pairs);
    - ``rewards|logps|logits/desirable`` and ``/undesirable``: means over the examples of that label, and
      ``rewards/margins`` the desirable mean minus the undesirable one (TRL's KTO margins);
    - ``kl``: the KL estimate the loss used (its ``term_values["kl"]``, per example; KTO only);
    - ``fraction_desirable``: the share of desirable examples seen.
    """

    NAMES = UNPAIRED_METRICS

    def add(
        self,
        losses: torch.Tensor,
        rewards: torch.Tensor,
        policy: RankedOutputs,
        num_tokens: int,
        terms: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        terms = dict(terms or {})
        kl = terms.pop("kl", None)
        examples = unpaired_outputs(policy)
        desirable = examples.desirable.to(rewards.device)
        undesirable = ~desirable
        r = rewards.detach().double()
        logits = examples.mean_logits if examples.mean_logits is not None else torch.zeros_like(examples.logps)
        logps, logits = examples.logps.detach().double().to(r.device), logits.detach().double().to(r.device)
        every = torch.ones_like(desirable)

        right = torch.where(desirable, r > 0, r < 0).double()
        pairs = [
            masked_sum(losses.detach().double(), every),
            masked_sum(right, every),
            masked_sum(r, desirable),
            masked_sum(r, undesirable),
            masked_sum(logps, desirable),
            masked_sum(logps, undesirable),
            masked_sum(logits, desirable),
            masked_sum(logits, undesirable),
            masked_sum(kl.detach().double(), every) if kl is not None else (r.new_zeros(()), r.new_zeros(())),
            masked_sum(desirable.double(), every),
        ]
        self._add_counted(pairs, policy.router_aux_loss, examples.num_examples, num_tokens, terms)

    def means(self) -> dict[str, float]:
        means, counts = self.counted_means()
        if not counts[UNPAIRED_METRICS.index("kl")]:
            del means["kl"]  # a loss without a KL term
        means["rewards/margins"] = means["rewards/desirable"] - means["rewards/undesirable"]
        means.update(self._shared_means())
        return means


class MetricsLogger:
    """Appends one JSON object per log call to ``run/metrics.jsonl``, and passes the same values to the run's
    trackers (`dpokit.trackers`: TensorBoard, W&B, MLflow, trackio) as ``split/name``.

    A tracker that fails (its server unreachable, its disk full) is dropped with one note through `announce`:
    hours of training never stop for a dashboard, and ``metrics.jsonl`` keeps every value."""

    def __init__(self, run_dir: Path, enabled: bool = True, trackers: Sequence = (), announce=print):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.trackers = list(trackers) if enabled else []
        self.announce = announce
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _to_trackers(self, call) -> None:
        """`call(tracker)` for each tracker; one that raises is dropped, with a note."""
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # any tracker error: network, auth, disk, a changed API
                self.trackers.remove(tracker)
                self.announce(
                    f"{tracker.name} failed ({type(exc).__name__}: {exc}); the run goes on without it, "
                    "metrics.jsonl has every value"
                )

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **metrics}
        with self.path.open("a") as f:  # closed at once: a killed process loses no line (`sync` covers the OS)
            f.write(json.dumps(record) + "\n")
        values = {f"{split}/{name}": value for name, value in metrics.items()}
        self._to_trackers(lambda tracker: tracker.log(step, values))

    def log_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        """Append the policy's replies at `step` to ``samples.jsonl`` (one record per prompt) and the trackers."""
        if not self.enabled or not samples:
            return
        with (self.path.parent / SAMPLES_FILE).open("a") as f:
            f.write("".join(json.dumps({"step": step, **sample}) + "\n" for sample in samples))
        self._to_trackers(lambda tracker: tracker.log_samples(step, samples))

    def sync(self) -> None:
        """Force the lines written so far to disk. Called before each checkpoint: a resume keeps exactly the lines
        up to its checkpoint, so those are the ones an OS crash must not lose (an fsync per line cost 2 ms a step)."""
        if not self.enabled:
            return
        for path in (self.path, self.path.parent / SAMPLES_FILE):
            if path.is_file():
                with path.open("rb") as f:
                    os.fsync(f.fileno())

    def close(self) -> None:
        self.sync()
        self._to_trackers(lambda tracker: tracker.close())
        self.trackers = []


SAMPLES_FILE = "samples.jsonl"


def read_samples(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``samples.jsonl`` (step, prompt, completion), read like `read_metrics`."""
    return read_records(Path(run_dir) / SAMPLES_FILE)


def read_metrics(run_dir: str | Path, split: Optional[str] = None) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl``, optionally of one split only.

    A last line without its newline that is not valid JSON is a write cut short (a run killed while
    logging) and is left out; any other line that is not a record is an error naming the line.
    """
    records = read_records(Path(run_dir) / METRICS_FILE)
    return [r for r in records if split is None or r.get("split") == split]


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records, one per line, of a run's log file (each an object with an integer ``step``)."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").split("\n")  # the last item is "" when the file ends in a newline
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # torn: a resumed run logs that step again
                break
            raise DpokitError(
                f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                "delete that line (or restore the file) and run again"
            ) from exc
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise DpokitError(
                f"{path} line {number}: not a metrics record (a JSON object with a step); "
                "delete that line (or restore the file) and run again"
            )
        records.append(record)
    return records


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop the records of ``metrics.jsonl`` and ``samples.jsonl`` past `after_step` (a resumed run writes the
    steps after its checkpoint again) and a torn last line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    keep = [r for r in read_metrics(run_dir) if r["step"] <= after_step]
    write_text_within(run_dir, "run", path, "".join(json.dumps(r) + "\n" for r in keep))
    if (Path(run_dir) / SAMPLES_FILE).is_file():  # the replies too: a resumed run writes its later evals again
        kept = [r for r in read_samples(run_dir) if r["step"] <= after_step]
        write_text_within(run_dir, "run", Path(run_dir) / SAMPLES_FILE, "".join(json.dumps(r) + "\n" for r in kept))


def training_progress(console: Optional[Console] = None, enabled: bool = True) -> Progress:
    """A rich progress bar with rate, ETA and a live loss/accuracy field."""
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=not enabled,
        transient=False,
    )


def column_table(title: str, caption: str, columns: Iterable[str]) -> Table:
    """A table of one labelled row per figure and one right-aligned column per split (prepare's, the audit's)."""
    table = Table(title=title, caption=caption)
    table.add_column("")
    for column in columns:
        table.add_column(column, justify="right")
    return table


def summary_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    return table


PLOTS = {
    "loss": ["loss"],
    "accuracy": ["rewards/accuracies"],
    "margins": ["rewards/margins"],
    "rewards": ["rewards/chosen", "rewards/rejected"],
}


PLOT_INSTALL = "pip install matplotlib"  # a dependency, but an environment can still lack it


def pyplot(purpose: str = "drawing curves"):
    """``matplotlib.pyplot`` on the file-only Agg backend; `DpokitError` naming the extra to install (and
    what it was for, `purpose`) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise DpokitError(f"{purpose} needs matplotlib, a dpokit dependency missing here: {PLOT_INSTALL}") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path, out_dir: Optional[str | Path] = None) -> list[Path]:
    """PNG curves of a run (train vs eval): loss, reward accuracy, margins, rewards, and each term of a
    weighted loss combination (``loss_terms.png``) when it has them.

    Raises `DpokitError` naming the extra to install when matplotlib is missing."""
    plt = pyplot()
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    check_replaceable(out_dir, "plots", overwrite=True)  # new, empty or its own: a user's loss.png is not replaced
    if not is_dpokit_artifact(out_dir, "plots"):
        out_dir.mkdir(parents=True, exist_ok=True)
        write_marker(out_dir, "plots")
    records = read_metrics(run_dir)
    written = []
    terms = sorted({key for r in records for key in r if key.startswith("loss/")})  # a weighted combination's terms
    panels = {**PLOTS, **({"loss_terms": terms} if terms else {})}
    for name, keys in panels.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for split, style in (("train", "-"), ("eval", "o-")):
            rows = [r for r in records if r["split"] == split]
            for key in keys:
                points = [(r["step"], r[key]) for r in rows if key in r]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, label=f"{split} {key}", markersize=4)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        replace_within(out_dir, "plots", path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
        written.append(path)
    return written
