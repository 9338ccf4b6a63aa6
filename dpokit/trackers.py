"""Experiment trackers a run reports to besides ``metrics.jsonl``: TensorBoard, Weights & Biases, MLflow, trackio.

``logging.report_to`` names them; each package is an optional extra, imported only when named. Every
tracker gets the same metric names (``train/loss``, ``eval/rewards/accuracies``, ...), the resolved
config as the run's parameters, and the eval replies as a text table. The run ids are kept in
``RUN/trackers.json`` so that ``--resume`` continues the same tracker runs instead of starting new ones.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from dpokit.artifacts import write_text_within
from dpokit.config import flatten
from dpokit.errors import DpokitError

TRACKERS_FILE = "trackers.json"


def extra_of(name: str) -> str:
    """The install command for tracker `name`'s optional extra."""
    return f"pip install 'dpokit[{name}]'"


def missing_trackers(names: list[str]) -> list[str]:
    """The trackers in `names` whose package does not import (imported here, as opening them would)."""
    missing = []
    for name in names:
        try:
            importlib.import_module(TRACKER_CLASSES[name].module)
        except ImportError:
            missing.append(name)
    return missing


def check_trackers(names: list[str], default: list[str]) -> None:
    """Refuse, before any work, a tracker the config asks for by name whose package is missing (one in
    `default`, the trackers a config gets without naming any, is not refused)."""
    missing = [name for name in missing_trackers(names) if name not in default]
    if missing:
        installs = "; ".join(extra_of(name) for name in missing)
        raise DpokitError(
            f"logging.report_to names {', '.join(missing)}, not installed: {installs} "
            "(or leave it out of logging.report_to)"
        )


def samples_markdown(samples: list[dict[str, str]]) -> str:
    """The eval replies as a Markdown table (prompt, completion)."""
    rows = "\n".join(f"| {s['prompt']!r} | {s['completion']!r} |" for s in samples)
    return "| prompt | completion |\n|---|---|\n" + rows


class TensorBoardTracker:
    name, module = "tensorboard", "torch.utils.tensorboard"  # the module it imports

    def __init__(self, run_dir: Path, **_: Any):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.run_id = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        self.writer.add_text("eval/samples", samples_markdown(samples), step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run (``WANDB_MODE=offline`` works as usual); its files go to ``RUN/wandb/``."""

    name, module = "wandb", "wandb"

    def __init__(self, run_dir: Path, project: str, run_name: str, config: dict, run_id: Optional[str], **_: Any):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project,
            name=run_name,
            config=config,
            dir=str(run_dir),
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run_id = self.run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        table = self.wandb.Table(
            columns=["prompt", "completion"], data=[[s["prompt"], s["completion"]] for s in samples]
        )
        self.run.log({"eval/samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run in experiment `project`, at ``logging.mlflow_tracking_uri`` (else ``MLFLOW_TRACKING_URI``,
    else MLflow's default)."""

    name, module = "mlflow", "mlflow"

    def __init__(
        self, project: str, run_name: str, config: dict, run_id: Optional[str], tracking_uri: Optional[str], **_: Any
    ):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            params = dict(flatten(config))  # MLflow takes flat parameters
            keys = sorted(params)
            for start in range(0, len(keys), 100):  # MLflow takes at most 100 parameters a call
                self.client.log_batch(run_id, params=[_mlflow_param(k, params[k]) for k in keys[start : start + 100]])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), timestamp, step) for k, v in metrics.items()])

    def log_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        self.client.log_text(self.run_id, samples_markdown(samples), f"samples/step_{step:08d}.md")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, json.dumps(value) if isinstance(value, (list, dict)) else str(value))


class TrackioTracker:
    """A trackio run (local SQLite under ``TRACKIO_DIR`` unless trackio is pointed at a Space)."""

    name, module = "trackio", "trackio"

    def __init__(self, project: str, run_name: str, config: dict, run_id: Optional[str], **_: Any):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(
            project=project, name=run_id or run_name, config=config, resume="allow" if run_id else "never"
        )
        self.run_id = self.run.name

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.trackio.log(metrics, step=step)

    def log_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        self.trackio.log({"eval/samples": self.trackio.Markdown(samples_markdown(samples))}, step=step)

    def close(self) -> None:
        self.trackio.finish()


TRACKER_CLASSES = {cls.name: cls for cls in (TensorBoardTracker, WandbTracker, MlflowTracker, TrackioTracker)}
TRACKERS = tuple(TRACKER_CLASSES)  # the names `logging.report_to` takes


def open_trackers(
    names: list[str],
    run_dir: Path,
    project: str,
    run_name: Optional[str],
    config: dict,
    resume: bool,
    tracking_uri: Optional[str] = None,
) -> list:
    """The installed trackers of `names`, started (or, with `resume`, continued from ``RUN/trackers.json``).

    The run ids are recorded in ``RUN/trackers.json`` (inside the run directory, through `dpokit.artifacts`).
    """
    ids_path = run_dir / TRACKERS_FILE
    known = json.loads(ids_path.read_text()) if resume and ids_path.is_file() else {}
    missing = set(missing_trackers(names))
    trackers = []
    for name in names:
        if name in missing:
            continue
        try:
            trackers.append(
                TRACKER_CLASSES[name](
                    run_dir=run_dir,
                    project=project,
                    run_name=run_name or run_dir.resolve().name,
                    config=config,
                    run_id=known.get(name),
                    tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                )
            )
        except Exception as exc:  # not logged in, no server, a bad URI: before any training, one line
            for started in trackers:
                started.close()
            raise DpokitError(
                f"logging.report_to: {name} did not start ({type(exc).__name__}: {exc}); fix its setup "
                f"(for W&B offline: WANDB_MODE=offline) or leave it out of logging.report_to"
            ) from exc
    ids = {t.name: t.run_id for t in trackers if t.run_id is not None}
    if ids:
        write_text_within(run_dir, "run", ids_path, json.dumps(ids, indent=2) + "\n")
    return trackers
