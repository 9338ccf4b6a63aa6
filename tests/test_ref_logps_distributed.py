"""Multi-process `dpokit ref-logps` (gloo on CPU) and the worker launcher's failure handling.

Each multi-process run is a subprocess with a timeout, so a hang fails the test instead of the suite.
Spawned workers import the functions below by module name: keep this module's imports light.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two processes each: CI runs them with -m slow

TESTS_DIR = Path(__file__).parent
TIMEOUT_S = 180


def worker_env() -> dict[str, str]:
    # One thread per worker: two workers share this 2-core machine.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS_DIR)}


def launch_in_subprocess(worker: str) -> subprocess.CompletedProcess:
    """Run `launch_workers(2, <worker>)` in a fresh interpreter; a `DpokitError` is printed and exits 1."""
    code = (
        "import sys, test_ref_logps_distributed as t\n"
        "from dpokit.distributed import launch_workers\n"
        "from dpokit.errors import DpokitError\n"
        "try:\n"
        f"    launch_workers(2, t.{worker})\n"
        "except DpokitError as exc:\n"
        "    print(f'error: {exc}', file=sys.stderr)\n"
        "    sys.exit(1)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=worker_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )


def fail_on_rank_one() -> None:
    """Rank 1 crashes; rank 0 waits in a collective that rank 1 never joins."""
    from dpokit.distributed import barrier, init_distributed

    if init_distributed().rank == 1:
        raise ValueError("rank one broke")
    barrier()


def refuse_on_main() -> None:
    """Rank 0 finds a user error inside `main_result`; every rank must stop with it."""
    from dpokit.distributed import init_distributed, main_result
    from dpokit.errors import DpokitError

    init_distributed()

    def check_inputs() -> None:
        raise DpokitError("ref.h5 was made from other inputs; pass --overwrite")

    main_result(check_inputs)


@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "sharded"])
def test_two_processes_write_the_same_values_as_the_live_computation(tiny_model_dir, prepared_dir, tmp_path, sharded):
    from conftest import assert_cache_equals, live_logps, ref_logps_args

    out = tmp_path / "ref.h5"
    args = ref_logps_args(prepared_dir, tiny_model_dir, out, "--gpus", "2", "--batch-size", "3")
    args = ["--debug", *args, "--shard-model"] if sharded else args  # 32 rows in 11 batches: a rank runs out first
    run = subprocess.run(
        [sys.executable, "-m", "dpokit", *args], env=worker_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert run.returncode == 0, run.stderr
    assert "32 new / 32" in run.stdout and run.stdout.count("reference log-probs") == 1  # rank 0 alone reports
    assert_cache_equals(out, live_logps(tiny_model_dir, prepared_dir))
    if sharded:  # each rank held half the weights
        for rank in (0, 1):
            assert f"rank {rank}: the reference is sharded over 2 processes" in run.stderr


def test_a_crashed_worker_stops_the_run_with_its_error():
    started = time.monotonic()
    run = launch_in_subprocess("fail_on_rank_one")
    assert run.returncode == 1
    assert "error: worker rank 1 failed: ValueError: rank one broke" in run.stderr
    assert 'in fail_on_rank_one\n    raise ValueError("rank one broke")' in run.stderr  # its traceback is shown
    assert time.monotonic() - started < TIMEOUT_S / 2


def test_a_user_error_on_rank_zero_stops_every_worker_with_one_clear_message():
    run = launch_in_subprocess("refuse_on_main")
    assert run.returncode == 1
    assert "error: ref.h5 was made from other inputs; pass --overwrite (worker rank" in run.stderr
    assert "Traceback" not in run.stderr


def test_single_process_helpers_need_no_process_group():
    import torch

    from dpokit.distributed import (
        DistInfo,
        any_rank,
        broadcast_from_main,
        gather_to_main,
        init_distributed,
        main_result,
    )

    assert init_distributed() == DistInfo(rank=0, world_size=1, local_rank=0) and init_distributed().is_main
    assert gather_to_main({"rows": 3}) == [{"rows": 3}]
    assert broadcast_from_main("same") == "same"
    assert main_result(lambda x: x + 1, 1) == 2
    assert any_rank([True, False], torch.device("cpu")) == [True, False]


def test_cpu_workers_share_the_cores_unless_the_user_set_threads(monkeypatch):
    import torch

    from dpokit.distributed import _cpu_threads_per_worker

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with _cpu_threads_per_worker(2):
        assert os.environ["OMP_NUM_THREADS"] == "4"  # what the spawned workers inherit
    assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with _cpu_threads_per_worker(2):
        assert os.environ["OMP_NUM_THREADS"] == "3"
