"""Experiment trackers: W&B (offline), MLflow (local file store) and trackio (local SQLite) receive the values
metrics.jsonl has, under the same names, with the config as parameters, and a resumed run continues them."""

from __future__ import annotations

import json
import struct
import sys

import pytest
import yaml

from dpokit.cli import main
from dpokit.errors import DpokitError
from dpokit.metrics import read_metrics
from dpokit.trackers import TRACKERS_FILE, check_trackers


def wandb_records(path):
    """The records of a W&B offline run file (``.wandb``: a 7-byte header, then LevelDB-log records in
    32 KiB blocks, each a protobuf `Record`)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, pos, chunks = path.read_bytes(), 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            yield Record.FromString(chunks)
            chunks = b""


def wandb_history(run_dir) -> dict[int, dict]:
    """Logged values by step over the offline files of `run_dir`'s W&B run (a resume writes one more)."""
    history: dict[int, dict] = {}
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len({f.name for f in files}) == 1, files  # one run id
    for record in (r for f in files for r in wandb_records(f)):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(items.pop("_step"), {}).update(items)
    return history


def expected_values(run_dir) -> dict[int, dict]:
    """metrics.jsonl as ``{step: {"split/name": value}}``."""
    values: dict[int, dict] = {}
    for record in read_metrics(run_dir):
        step, split = record.pop("step"), record.pop("split")
        values.setdefault(step, {}).update({f"{split}/{k}": v for k, v in record.items()})
    return values


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store unless asked
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"file:{tmp_path / 'mlruns'}"


@pytest.mark.slow
def test_wandb_mlflow_and_trackio_get_every_logged_value_and_a_resume_continues_their_runs(
    train_cli, tmp_path, offline_trackers
):
    from mlflow.tracking import MlflowClient
    from trackio import SQLiteStorage

    run = tmp_path / "run"
    common = (
        "--max-steps",
        "2",
        "training.eval_every=2",
        "eval.samples=1",
        "eval.max_new_tokens=3",
        "logging.report_to=[wandb,mlflow,trackio]",
        "logging.project=dpokit-test",
        f"logging.mlflow_tracking_uri={offline_trackers}",
    )
    assert main(train_cli(run, *common)) == 0
    first_ids = json.loads((run / TRACKERS_FILE).read_text())
    assert main(train_cli(run, *common[2:], "--max-steps", "4", "--resume", "--allow-config-change")) == 0
    ids = json.loads((run / TRACKERS_FILE).read_text())
    assert ids == first_ids and set(ids) == {"wandb", "mlflow", "trackio"}  # the same runs, continued
    expected = expected_values(run)
    assert sorted(expected) == [1, 2, 3, 4] and "eval/rewards/accuracies" in expected[4]

    history = wandb_history(run)
    for step, values in expected.items():
        assert {k: history[step][k] for k in values} == pytest.approx(values, rel=1e-6)
    assert (history[4]["eval/samples/_type"], history[4]["eval/samples/nrows"]) == ("table-file", 1)  # the replies

    client = MlflowClient(offline_trackers)
    mlflow_run = client.get_run(ids["mlflow"])
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert mlflow_run.data.params["optimizer.lr"] == str(config["optimizer"]["lr"])
    assert mlflow_run.data.params["logging.report_to"] == '["wandb", "mlflow", "trackio"]'
    assert mlflow_run.info.status == "FINISHED"
    for name in ("train/loss", "eval/rewards/margins"):
        logged = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], name)}
        assert logged == pytest.approx({s: v[name] for s, v in expected.items() if name in v}, rel=1e-6)
    assert [a.path for a in client.list_artifacts(ids["mlflow"], "samples")] == [
        "samples/step_00000002.md",
        "samples/step_00000004.md",
    ]

    logs = SQLiteStorage.get_logs("dpokit-test", ids["trackio"])
    trackio_loss = {entry["step"]: entry["train/loss"] for entry in logs if "train/loss" in entry}
    assert trackio_loss == pytest.approx({s: v["train/loss"] for s, v in expected.items()}, rel=1e-6)
    assert SQLiteStorage.get_run_config("dpokit-test", ids["trackio"])["optimizer"]["lr"] == config["optimizer"]["lr"]


def test_a_named_tracker_that_is_not_installed_stops_the_run_before_the_model_loads(
    train_cli, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as without the extras
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(DpokitError) as error:
        check_trackers(["tensorboard", "wandb"], default=["tensorboard"])  # a missing default is only noted
    assert str(error.value) == (
        "logging.report_to names wandb, not installed: pip install 'dpokit[wandb]' (or leave it out of logging.report_to)"
    )
    assert main(train_cli(tmp_path / "run", "--max-steps", "1", "logging.report_to=wandb")) == 1
    assert "logging.report_to names wandb, not installed" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_unknown_tracker_name_is_refused_with_the_choices(train_cli, tmp_path, capsys):
    assert main(train_cli(tmp_path / "run", "logging.report_to=[wandb,neptune]")) == 1
    assert (
        "logging.report_to[1]='neptune' is not valid; choose one of: tensorboard, wandb, mlflow, trackio"
        in capsys.readouterr().err
    )


def test_a_tracker_that_fails_mid_run_is_dropped_with_one_note_and_metrics_jsonl_keeps_every_value(tmp_path):
    from dpokit.metrics import MetricsLogger

    class Flaky:
        name, logged, other = "wandb", [], []

        def log(self, step, values):
            if step == 2:
                raise ConnectionError("wandb.ai unreachable")
            self.logged.append(step)

        def log_samples(self, step, samples):
            self.other.append(("samples", step))

        def close(self):
            self.other.append("closed")

    notes = []
    logger = MetricsLogger(tmp_path, trackers=[Flaky()], announce=notes.append)
    logger.log_samples(1, [{"prompt": "p", "completion": "c"}])
    for step in (1, 2, 3):
        logger.log(step, "train", {"loss": 0.5})
    logger.log_samples(3, [{"prompt": "p", "completion": "c"}])
    logger.close()
    assert Flaky.logged == [1] and [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert Flaky.other == [("samples", 1)]  # dropped at step 2: no samples at step 3, and no close
    assert notes == [
        "wandb failed (ConnectionError: wandb.ai unreachable); the run goes on without it, "
        "metrics.jsonl has every value"
    ]


def test_a_tracker_that_cannot_start_stops_the_run_before_training_in_one_line(
    train_cli, tmp_path, capsys, offline_trackers
):
    assert (
        main(
            train_cli(
                tmp_path / "run",
                "--max-steps",
                "1",
                "logging.report_to=mlflow",
                "logging.mlflow_tracking_uri=nosuchscheme://nowhere",
            )
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "logging.report_to: mlflow did not start (" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
