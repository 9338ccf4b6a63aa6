"""Fault injection for `dpokit train`: signals, divergence, concurrent writers, killed launchers and
resumes that would change the run. Each test does what a user or a scheduler would do and checks
that nothing is lost: a loadable checkpoint remains and a resume continues exactly."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import TWO_PROCESS_RUN
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.metrics import read_metrics
from dpokit.preemption import INTERRUPTED_EXIT_CODE


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, "train")]


def start_train(argv: list[str]) -> subprocess.Popen:
    """`dpokit train` in its own process (and process group), as a user or a scheduler starts it."""
    return subprocess.Popen(
        [sys.executable, "-m", "dpokit", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_steps(run_dir: Path, steps: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        if process.poll() is not None:
            raise AssertionError(f"train ended early: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("train did not reach the step in time")


# ----------------------------------------------------------------------------------------------
# preemption


SIGTERM_LOSS = textwrap.dedent(
    """
    import os, signal
    from dpokit.losses import DPOLoss

    class SigtermAt(DPOLoss):
        # DPO that sends its own process SIGTERM during its `at`-th call, as a scheduler's preemption
        # would; once per `once` file, so the resumed run is not stopped again.

        def __init__(self, at: int = 3, once: str = "", **kwargs):
            super().__init__(**kwargs)
            self.at, self.once, self.calls = at, once, 0

        def forward(self, policy, reference):
            self.calls += 1
            if self.calls == self.at and not os.path.exists(self.once):
                open(self.once, "w").close()
                os.kill(os.getpid(), signal.SIGTERM)
            return super().forward(policy, reference)
    """
)


def test_sigterm_checkpoints_and_resume_equals_the_uninterrupted_run(train_cli, tmp_path, monkeypatch, capsys):
    (tmp_path / "sigterm_loss_module.py").write_text(SIGTERM_LOSS)
    monkeypatch.syspath_prepend(str(tmp_path))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(train_cli(whole, "--max-steps", "6", "data.batch_size=2")) == 0
    sigterm_at_3 = ["--loss", "sigterm_loss_module:SigtermAt", "loss.at=3", f"loss.once={tmp_path / 'signalled'}"]
    code = main(train_cli(cut, "--max-steps", "6", "data.batch_size=2", *sigterm_at_3))
    err = capsys.readouterr().err
    assert code == INTERRUPTED_EXIT_CODE, err[-2000:]
    assert "received SIGTERM" in err and "stopped by SIGTERM after step 3/6" in err
    assert f"Resume with: dpokit train --config {cut / 'config.yaml'} --resume" in err
    assert len(losses(cut)) == 3 and (cut / "checkpoints" / "step_0000003").is_dir()
    assert main(["train", "--config", str(cut / "config.yaml"), "--resume"]) == 0
    assert losses(cut) == pytest.approx(losses(whole), abs=1e-6)


@pytest.mark.slow
def test_a_two_process_run_stopped_by_sigterm_resumes_to_the_uninterrupted_run(train_cli, two_process_run, tmp_path):
    cut = tmp_path / "cut"
    # SIGTERM to the launcher, as a scheduler's preemption: the workers checkpoint and the run exits 75.
    process = start_train(train_cli(cut, *TWO_PROCESS_RUN))
    wait_for_steps(cut, 2, process)
    os.kill(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == INTERRUPTED_EXIT_CODE, stderr[-2000:]
    assert "received SIGTERM" in stderr
    assert f"Resume with: dpokit train --config {cut / 'config.yaml'} --resume --gpus 2" in stderr
    stopped_at = len(losses(cut))
    assert stopped_at < 12 and (cut / "checkpoints" / f"step_{stopped_at:07d}").is_dir()
    marker = json.loads((cut / "stopped.json").read_text())  # for a requeue rule where the exit code is lost
    assert marker["step"] == stopped_at and marker["resume"].endswith("--resume --gpus 2")
    done = subprocess.run(
        [sys.executable, "-m", "dpokit", *train_cli(cut, *TWO_PROCESS_RUN, "--resume")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert losses(cut) == pytest.approx(losses(two_process_run), abs=1e-6)  # every loss as if nothing had happened
    assert not (cut / "stopped.json").exists()  # resumed: no longer stopped


@pytest.mark.slow
def test_a_two_process_run_killed_with_kill_9_resumes_to_the_uninterrupted_run(
    train_cli, two_process_run, tmp_path, capsys
):
    cut = tmp_path / "cut"
    # kill -9 of launcher and workers at once, mid-step, mid-checkpoint or between, after the first checkpoint.
    process = start_train(train_cli(cut, *TWO_PROCESS_RUN))
    deadline = time.monotonic() + 120
    while not list((cut / "checkpoints").glob("step_*")) and time.monotonic() < deadline:  # renamed into place: whole
        assert process.poll() is None, "train ended early"
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.0, 0.6))
    kill_launcher_and_workers(process, cut)
    assert process.returncode != 0, "the run finished before the kill landed; give it more steps"

    # Resumed: the dead run's lock is taken over; while it runs, a second writer is refused.
    process = start_train(train_cli(cut, *TWO_PROCESS_RUN, "--resume"))
    wait_for_steps(cut, len(losses(cut)) + 1, process)
    assert main(train_cli(cut, "--max-steps", "2", "--overwrite")) == 1
    holder = json.loads((cut / ".dpokit.lock").read_text())["pid"]
    assert holder in workers_of(cut)  # rank 0 of the running run
    err = capsys.readouterr().err
    assert f"is being written by another dpokit process (pid {holder} on {socket.gethostname()}" in err
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "taking over" in stderr and "no longer runs" in stderr
    assert losses(cut) == pytest.approx(losses(two_process_run), abs=1e-6)  # every loss as if nothing had happened


def kill_launcher_and_workers(process: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL a `--gpus N` run's launcher and workers together: no one gets to clean up."""
    deadline = time.monotonic() + 30
    pids = [process.pid, *workers_of(run_dir)]
    while pids and time.monotonic() < deadline:  # a worker still starting when the kill came shows up late
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # it ended between the listing and the kill
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        pids = workers_of(run_dir)
    process.communicate()


@pytest.mark.slow
def test_killing_the_launcher_stops_its_workers_with_a_checkpoint(train_cli, tmp_path):
    run = tmp_path / "run"
    process = start_train(train_cli(run, "--max-steps", "400", "--gpus", "2"))
    wait_for_steps(run, 2, process)
    process.kill()  # kill -9 the launcher: nothing forwards a signal, the workers must notice by themselves
    process.communicate()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and workers_of(run):
        time.sleep(0.5)
    assert not workers_of(run), "the workers outlived their launcher"
    assert list((run / "checkpoints").glob("step_*")), "the workers stopped without a checkpoint"
    assert not (run / ".dpokit.lock").exists()


def workers_of(run_dir: Path) -> list[int]:
    """Pids of processes whose command line names `run_dir` (the workers of a `--gpus N` run)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(run_dir) in command and "dpo.py" in command:
                pids.append(int(entry.name))
    return pids


# ----------------------------------------------------------------------------------------------
# divergence


@pytest.fixture
def nan_loss(misbehaving_losses) -> str:
    return f"{misbehaving_losses}:NaNAfter"


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(train_cli, tmp_path, nan_loss, capsys):
    run = tmp_path / "run"
    argv = train_cli(
        run, "--max-steps", "6", "--loss", nan_loss, "loss.after=3", "training.save_every=1", "training.keep_last=1"
    )
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "step 3: non-finite loss" in err and "on train pairs" in err
    assert f"Last good checkpoint: {run / 'checkpoints' / 'step_0000002'}" in err
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_0000002"]  # keep_last=1 kept the good one; nothing non-finite was saved
    weights = load_file(str(run / "checkpoints" / "step_0000002" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_skip_nonfinite_skips_the_batch_and_counts_it(train_cli, tmp_path, nan_loss):
    run = tmp_path / "run"
    argv = train_cli(run, "--max-steps", "4", "--loss", nan_loss, "loss.after=3", "training.skip_nonfinite=true")
    assert main(argv) == 0
    records = read_metrics(run, "train")
    assert [r.get("skipped_steps", 0) for r in records] == [0, 0, 1, 2]  # every call from the 3rd on is NaN
    final = load_file(str(run / "checkpoints" / "step_0000004" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())


# ----------------------------------------------------------------------------------------------
# one writer per run


def test_a_stale_lock_is_taken_over(train_cli, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".dpokit.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "earlier"}))
    assert main(train_cli(run, "--max-steps", "1")) == 0
    assert f"taking over {run / '.dpokit.lock'}: its owner (pid {dead.pid}) no longer runs" in capsys.readouterr().err
    assert not (run / ".dpokit.lock").exists()


# ----------------------------------------------------------------------------------------------
# the run directory


def test_resume_refuses_a_run_with_another_meaning(train_cli, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_cli(run, "--max-steps", "2", "training.save_every=1")) == 0
    saved = (run / "config.yaml").read_text()
    for change in (["--lr", "1e-3"], ["--loss", "ipo"], ["data.batch_size=8"]):
        assert main(train_cli(run, "--max-steps", "2", "--resume", *change)) == 1
        err = capsys.readouterr().err
        assert "with a different run" in err and "--allow-config-change" in err
    assert (run / "config.yaml").read_text() == saved  # the refused resumes did not rewrite it
    allowed = train_cli(run, "--max-steps", "3", "--resume", "--allow-config-change")
    assert main(allowed) == 0
    assert (run / "config.step_0000002.yaml").read_text() == saved  # the old settings are kept beside the new


def test_a_run_killed_before_its_first_checkpoint_is_told_to_overwrite(train_cli, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_cli(run, "--max-steps", "1")) == 0
    for checkpoint in (run / "checkpoints").glob("step_*"):
        import shutil

        shutil.rmtree(checkpoint)  # as if killed before the first save
    assert main(train_cli(run, "--max-steps", "1")) == 1
    err = capsys.readouterr().err
    assert "no checkpoint to resume from: pass --overwrite" in err and "--resume to continue" not in err
    assert main(train_cli(run, "--max-steps", "1", "--resume")) == 1
    assert "pass --overwrite to start it again" in capsys.readouterr().err


def test_train_never_writes_into_a_folder_that_is_not_a_run(train_cli, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("my own config\n")
    assert main(train_cli(folder, "--max-steps", "1", "--overwrite")) == 1
    assert "is a non-empty directory that is not a dpokit run" in capsys.readouterr().err
    assert (folder / "config.yaml").read_text() == "my own config\n"
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]


def test_overwrite_removes_only_what_the_old_run_wrote(train_cli, tmp_path):
    run = tmp_path / "run"
    assert main(train_cli(run, "--max-steps", "2", "training.save_every=1")) == 0
    (run / "notes.txt").write_text("my notes")
    (run / "checkpoints" / "keep_me").mkdir()
    assert main(train_cli(run, "--max-steps", "1", "--overwrite")) == 0
    assert (run / "notes.txt").read_text() == "my notes"
    assert (run / "checkpoints" / "keep_me").is_dir()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000001"]
    assert len(losses(run)) == 1


def test_a_second_ref_logps_into_the_same_cache_is_refused(tiny_model_dir, prepared_dir, tmp_path, capsys):
    cache = tmp_path / "ref.h5"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "ref.h5.lock").write_text(
            json.dumps(
                {"host": socket.gethostname(), "pid": holder.pid, "since": "now", "command": "dpokit ref-logps ..."}
            )
        )
        assert main(["ref-logps", str(prepared_dir), "--model", str(tiny_model_dir), "--out", str(cache)]) == 1
        assert (
            f"reference cache {cache} is being written by another dpokit process (pid {holder.pid}"
            in capsys.readouterr().err
        )
        assert not cache.exists()
    finally:
        holder.kill()
        holder.wait()
    assert (
        main(["ref-logps", str(prepared_dir), "--model", str(tiny_model_dir), "--out", str(cache)]) == 0
    )  # stale: taken over
    assert cache.exists() and not (tmp_path / "ref.h5.lock").exists()


def test_a_checkpoint_that_cannot_be_written_is_named_and_the_previous_kept(train_cli, tmp_path, monkeypatch, capsys):
    import dpokit.checkpoint as checkpoint

    run = tmp_path / "run"
    real_save = torch.save

    def disk_full_at_step_2(obj, path, *args, **kwargs):
        if "step_0000002" in str(path):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full_at_step_2)
    assert main(train_cli(run, "--max-steps", "3", "training.save_every=1")) == 1
    err = capsys.readouterr().err
    assert "cannot write checkpoint" in err and "No space left on device" in err
    assert f"resume from {run / 'checkpoints' / 'step_0000001'} with --resume" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001"]  # no half-written one


def test_save_every_minutes_saves_on_time(train_cli, tmp_path):
    run = tmp_path / "run"
    argv = train_cli(run, "--max-steps", "3", "training.save_every_minutes=1e-6", "training.keep_last=5")
    assert main(argv) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [
        "step_0000001",
        "step_0000002",
        "step_0000003",
    ]


def _with_file_size_limit(limit: int):
    import resource

    def apply() -> None:  # in the child only; Python ignores SIGXFSZ, so a write past it fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("command", ["prepare", "ref-logps"])
@pytest.mark.slow
def test_running_out_of_room_is_one_line_and_leaves_no_temporary_or_lock(
    command, pairs_jsonl, tokenizer_dir, tiny_model_dir, prepared_dir, tmp_path
):
    # `ulimit -f` stands in for a full disk: the same failed writes, without filling the machine's disk.
    out = tmp_path / ("prepared" if command == "prepare" else "ref.h5")
    args = (
        ["prepare", str(pairs_jsonl), "--model", str(tokenizer_dir), "--out", str(out)]
        if command == "prepare"
        else ["ref-logps", str(prepared_dir), "--model", str(tiny_model_dir), "--out", str(out)]
    )
    done = subprocess.run(
        [sys.executable, "-m", "dpokit", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        preexec_fn=_with_file_size_limit(3000),
        timeout=300,
    )
    err = done.stderr.strip()
    assert done.returncode == 1, err[-2000:]
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[-2000:]
    assert "ulimit -f" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary sibling, no lock


def test_a_shard_write_that_runs_out_of_room_is_named_not_dcps_traceback(tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException

    from dpokit.checkpoint import _cannot_write

    shard = tmp_path / "run" / "checkpoints" / ".step_0000002.tmp-1" / "shards" / "__0_0.distcp"
    wrapped = RuntimeError("unexpected pos 1024 vs 512")
    wrapped.__cause__ = OSError(28, "No space left on device", str(shard))
    failure = CheckpointException("CheckpointException ranks:dict_keys([0])", {0: (wrapped, None)})
    message = str(_cannot_write(tmp_path / "run" / "checkpoints" / "step_0000002", tmp_path / "run", failure))
    assert f"(No space left on device on {shard})" in message and "unexpected pos" not in message
    assert "Traceback" not in message and len(message.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.xfail(
    strict=False,
    reason="known race, not fixed yet: in 2 of 5 CI runs on 2026-12-07 (one of them on an idle machine) the launcher "
    "was still running 120 s after a SIGTERM sent while its workers were importing; it passes alone and in this "
    "file's order locally. Suspected: torch elastic's SignalException raised inside a retry loop that catches "
    "Exception during the workers' start-up, so the stop is lost and the workers train on",
)
def test_a_signal_while_the_workers_start_does_not_claim_a_checkpoint(train_cli, tmp_path):
    run = tmp_path / "run"
    process = start_train(train_cli(run, "--max-steps", "400", "--gpus", "2"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not workers_of(run):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # the workers are still importing and setting up
    _, err = process.communicate(timeout=120)
    assert process.returncode == INTERRUPTED_EXIT_CODE, err[-2000:]
    assert not list((run / "checkpoints").glob("step_*"))
    assert "one stopped while starting has nothing to resume: start it again" in err
    assert "after writing a checkpoint" not in err


@pytest.mark.slow
def test_a_checkpoint_that_outgrows_the_file_size_limit_is_one_line_and_leaves_no_half_checkpoint(train_cli, tmp_path):
    run = tmp_path / "run"
    argv = train_cli(run, "--max-steps", "2", "--method", "full", "training.save_every=1")
    done = subprocess.run(
        [sys.executable, "-m", "dpokit", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_with_file_size_limit(100_000),
    )  # the full model's shards are larger
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1, done.stderr[-2000:]
    assert len(errors) == 1 and "cannot write checkpoint" in errors[0] and "File too large" in errors[0]
    assert "Traceback" not in done.stderr
    assert list((run / "checkpoints").iterdir()) == []  # no half-written checkpoint, no temporary


@pytest.mark.slow
def test_a_hung_process_ends_every_other_within_the_timeout_naming_it(train_cli, tmp_path):
    import threading

    run = tmp_path / "run"
    process = start_train(train_cli(run, "--max-steps", "400", "--gpus", "2", "distributed.timeout_s=3"))
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in process.stderr))
    stopped = None
    try:
        wait_for_steps(run, 3, process)  # past the first step: the steady-state timeout is in force
        holder = json.loads((run / ".dpokit.lock").read_text())["pid"]  # rank 0
        stopped = next(pid for pid in workers_of(run) if pid != holder)  # rank 1
        reader.start()
        os.kill(stopped, signal.SIGSTOP)  # hung: alive, holding its sockets, answering nothing
        hung_at = time.monotonic()
        deadline = hung_at + 60
        while time.monotonic() < deadline and not any("stopped answering" in line for _, line in lines):
            time.sleep(0.1)
        os.kill(stopped, signal.SIGKILL)  # as a scheduler would reap it (torch's agent does, 30 s after its SIGTERM)
        process.wait(timeout=120)
        reader.join(timeout=30)
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
    err = "".join(line for _, line in lines)
    errors = [(at, line) for at, line in lines if line.startswith("error:")]
    assert process.returncode == 1, err[-2000:]
    assert "rank 0: rank 1 stopped answering: a collective waited 3 s (distributed.timeout_s)" in errors[0][1], err
    assert errors[0][0] - hung_at < 3 + 3 + 5  # the timeout, then the monitored barrier's (3 s each)
    assert len(errors) == 2 and errors[1][1].startswith("error: worker rank ")  # the launcher's line
    assert "Traceback" not in err
