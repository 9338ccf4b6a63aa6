"""Process groups and FSDP2: the same code runs in one process, under `--gpus N`, or under torchrun.

Backends: NCCL on CUDA, gloo on CPU (how the tests run every multi-process path). Rank-0-only work
(logging, writing files) checks `DistInfo.is_main` from `init_distributed()`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar, Union

import torch
import torch.distributed as dist
from torch import nn

from dpokit.errors import DpokitError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


LAUNCHER_ENV = "DPOKIT_LAUNCHER"  # "gpus" in the workers `launch_workers` starts (`dpokit ... --gpus N`)
STARTUP_TIMEOUT_S = 1800.0  # `distributed.startup_timeout_s`'s default: loading, the first steps, saves


def init_distributed(startup_timeout_s: float = STARTUP_TIMEOUT_S) -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE env); a no-op in a single process.

    On CUDA the group is ``cuda:nccl,cpu:gloo`` (as torchtune's), so collectives over CPU tensors (FSDP's
    CPU-offloaded gradients, the clip norm over them) have a backend too. Collectives wait up to
    `startup_timeout_s` until `set_collective_timeout` shortens it for the steady-state steps. A gloo
    group of its own (`_WATCH_GROUP`) stays healthy when a collective times out, to ask who stopped answering.
    """
    global _WATCH_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        tie_to_launcher()
        timeout = timedelta(seconds=startup_timeout_s)
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
            dist.init_process_group("cuda:nccl,cpu:gloo", device_id=device, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
        _WATCH_GROUP = dist.new_group(backend="gloo", timeout=timeout)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


_WATCH_GROUP = None


def set_collective_timeout(seconds: float) -> None:
    """How long a collective of the default group waits for every process from now on (no-op in one process)."""
    if _in_group():
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(timedelta(seconds=seconds), None)


@contextmanager
def collective_timeout(seconds: float, then: float) -> Iterator[None]:
    """Collectives wait up to `seconds` inside (a checkpoint rank 0 writes while the others wait), `then` after."""
    set_collective_timeout(seconds)
    try:
        yield
    finally:
        set_collective_timeout(then)


def is_collective_timeout(exc: BaseException) -> bool:
    """Whether `exc` is a collective that waited past its timeout (gloo's and NCCL's wordings)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text) and _in_group()


def unresponsive_error(exc: BaseException, timeout_s: float) -> DpokitError:
    """The one line for a collective that timed out on this rank: which ranks stopped answering (a monitored
    barrier on the watch group, which the timeout left healthy) and what to do."""
    rank = dist.get_rank()
    who = "another process"
    try:
        dist.monitored_barrier(group=_WATCH_GROUP, timeout=timedelta(seconds=min(30.0, timeout_s)), wait_all_ranks=True)
    except RuntimeError as barrier:
        found = re.search(r"[Rr]anks? ([\d, ]+?) failed to pass", str(barrier))
        who = f"rank {found.group(1)}" if found else "rank 0" if rank != 0 else who
    return DpokitError(
        f"rank {rank}: {who} stopped answering: a collective waited {timeout_s:g} s (distributed.timeout_s) for it. "
        "A process hung, was stopped or lost its node; every process stops now. Resume with --resume from the "
        "last checkpoint; raise distributed.timeout_s if steps are legitimately that slow"
    )


def tie_to_launcher(poll_seconds: float = 1.0) -> None:
    """Make this worker stop with its launcher, and take signals only through it.

    - If the launcher (``dpokit --gpus N`` or torchrun) dies, even by ``kill -9``, the worker sends
      itself SIGTERM, which a training run answers by checkpointing and exiting
      (`dpokit.preemption`), instead of running on unsupervised. A daemon thread watches the parent
      pid; the kernel's ``PR_SET_PDEATHSIG`` was tried and made workers abort at exit now and then.
    - The worker leaves the terminal's process group, so one Ctrl-C reaches it once, forwarded by
      the launcher, rather than twice (directly and forwarded), which would mean "stop at once".
    """
    import signal
    import threading
    import time

    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="dpokit-launcher-watch", daemon=True).start()
    try:
        os.setsid()
    except OSError:  # already a session or group leader
        pass


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a (possibly peft-wrapped) causal LM."""
    from dpokit.logps import decoder_and_head

    return list(decoder_and_head(model)[0].layers)


def apply_fsdp(model: nn.Module, cfg, device: torch.device, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """FSDP2: shard each decoder layer, the embeddings+norm and the output head, then the root (4-bit base
    weights stay whole on every rank).

    Options (``distributed`` config): ``reshard_after_forward`` (free gathered weights after each
    layer's forward: less memory, one more all-gather in backward), ``cpu_offload`` (keep shards and
    optimizer state in CPU memory) and ``mixed_precision``: parameters kept in their own dtype (fp32
    master weights for ``model.precision=mixed``) are gathered in `compute_dtype` for the forward and
    backward, and gradients are reduced in fp32.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    params_dtype = next(model.parameters()).dtype
    if cfg.mixed_precision and compute_dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    elif params_dtype != compute_dtype:  # fp32 master weights need the cast to the compute dtype
        raise DpokitError("model.precision=mixed under FSDP needs distributed.mixed_precision=true")
    # 4-bit base weights (QLoRA) are frozen and a quarter of bf16's size: every rank keeps them whole, as
    # bitsandbytes' packed tensors cannot be all-gathered; FSDP2 shards the adapters and everything else.
    quantized = {p for p in model.parameters() if hasattr(p, "quant_state")}
    if quantized:
        kwargs["ignored_params"] = quantized
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=cfg.reshard_after_forward, **kwargs)
    from dpokit.logps import decoder_and_head

    # dpokit calls the decoder and the head directly (chunked log-probs), so each is its own FSDP unit.
    decoder, head = decoder_and_head(model)
    fully_shard(decoder, reshard_after_forward=cfg.reshard_after_forward, **kwargs)
    fully_shard(head, reshard_after_forward=False, **kwargs)
    fully_shard(model, reshard_after_forward=cfg.reshard_after_forward, **kwargs)
    return model


def init_fsdp_root(model: nn.Module) -> None:
    """Make `model` (sharded by `apply_fsdp`) FSDP2's root now. FSDP2 takes the first unit that runs forward as its
    root; dpokit calls the decoder and the head directly, so when the start-up check (a full `model(ids)`) is
    skipped the decoder would become a root and the head a second one, and the outer unit would never run."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model._get_fsdp_state()._lazy_init()  # what its first forward would do (no public call exists)


def background_group():
    """A gloo process group of its own for collectives run from a background thread (an asynchronous
    checkpoint's), so they never interleave with training's on the default group (None in one process)."""
    return dist.new_group(backend="gloo") if _in_group() else None


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit of `model` back in its sharded state: a forward outside training (a check) leaves
    the units that do not reshard after forward (the output head) gathered, and an optimizer built then
    would hold the gathered parameters instead of the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ----------------------------------------------------------------------------------------------
# Worker processes: launching N local workers (`--gpus N`), barriers, and
# gathers/broadcasts of Python objects. Each helper is a no-op in a single process (rank 0, world
# size 1, a gather returns ``[obj]``), so callers never branch on whether they are distributed.
# Under `torchrun` started by hand (single- or multi-node, with its rendezvous options) the
# environment already describes the group: `launched_by_torchrun()` is true and nothing is launched.


def launched_by_torchrun() -> bool:
    """True inside a worker started by torchrun / torchelastic (``WORLD_SIZE`` is set)."""
    return "WORLD_SIZE" in os.environ


def launch_workers(
    nprocs: int, entrypoint: Union[Callable[..., Any], Sequence[str]], args: Sequence[Any] = ()
) -> list[Any]:
    """Run `entrypoint` in `nprocs` local worker processes and wait for all of them.

    Args:
        entrypoint: one of
            - a module-level function, called as ``entrypoint(*args)`` in each worker. Workers are
              spawned, so a script that calls this needs the ``if __name__ == "__main__":`` guard
              (the ``dpokit`` command and ``python -m dpokit`` have it);
            - a command, ``[program, *program_args]``, run as ``program *program_args *args``.

    Returns the per-rank return values of a function entrypoint (``[]`` for a command).
    Each worker gets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    If any worker fails, the others are stopped and a `DpokitError` carries the first failure.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from dpokit.preemption import INTERRUPTED_EXIT_CODE, TrainingInterrupted

    if nprocs < 1:
        raise DpokitError(f"the number of workers must be at least 1, got {nprocs}")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nprocs,
        run_id=f"dpokit-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as `torchrun --standalone` picks
        max_restarts=0,
        monitor_interval=0.1,  # notice a dead worker quickly and stop its peers
        start_method="spawn",
    )
    if callable(entrypoint):
        target, target_args = entrypoint, tuple(args)
    else:
        target, target_args = entrypoint[0], (*map(str, entrypoint[1:]), *map(str, args))
    try:
        with _quiet_launcher_logs(), _cpu_threads_per_worker(nprocs), _launcher_env():
            results = elastic_launch(config, target)(*target_args)
    except ChildFailedError as exc:
        failed_rank, failure = exc.get_first_failure()
        if failure.exitcode == INTERRUPTED_EXIT_CODE:  # the workers checkpointed on a signal and said how to resume
            raise TrainingInterrupted(
                "the workers stopped on a signal after writing a checkpoint; their message above says how to resume"
            ) from exc
        raise DpokitError(_worker_failure_message(failed_rank, failure)) from exc
    except SignalException as exc:  # the launcher itself got SIGTERM/SIGINT; it forwarded it to the workers
        raise TrainingInterrupted(
            f"{signal_name(exc.sigval)} reached the launcher, which passed it to the workers. A run past its setup "
            "checkpoints and stops, and its message above says how to resume; one stopped while starting has "
            "nothing to resume: start it again"
        ) from exc
    if not callable(entrypoint):
        return []
    return [results[r] for r in sorted(results)]


@contextmanager
def _launcher_env() -> Iterator[None]:
    """Tell the workers `launch_workers` started them (`dpokit.run_dir.resume_command` prints ``--gpus N``)."""
    before = os.environ.get(LAUNCHER_ENV)
    os.environ[LAUNCHER_ENV] = "gpus"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LAUNCHER_ENV, None)
        else:
            os.environ[LAUNCHER_ENV] = before


def signal_name(signum) -> str:
    import signal

    try:
        return signal.Signals(int(signum)).name
    except ValueError:
        return f"signal {signum}"


def _worker_failure_message(failed_rank: int, failure) -> str:
    """The failed worker's own error; its traceback goes to stderr unless it was a `DpokitError`."""
    message = failure.message
    if isinstance(message, dict):
        text = str(message.get("message", ""))
        if text.startswith(f"{DpokitError.__name__}: "):
            return f"{text.removeprefix(f'{DpokitError.__name__}: ')} (worker rank {failed_rank})"
        callstack = message.get("extraInfo", {}).get("py_callstack")
        if callstack:
            print(f"--- worker rank {failed_rank} traceback ---\n{callstack}", file=sys.stderr)
        return f"worker rank {failed_rank} failed: {text}"
    if failure.exitcode is not None and failure.exitcode < 0:
        return f"worker rank {failed_rank} was killed by signal {-failure.exitcode} ({message})"
    return f"worker rank {failed_rank} exited with code {failure.exitcode}; its output is above"


@contextmanager
def cpu_threads(threads: Optional[int]) -> Iterator[None]:
    """Run with `threads` intra-op CPU threads (``--threads``), then restore the previous count; None keeps it."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise DpokitError(f"--threads must be at least 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _cpu_threads_per_worker(nprocs: int) -> Iterator[None]:
    """N workers share this machine's cores: each gets ``cores // N`` torch threads (``OMP_NUM_THREADS``,
    unless the user set it), instead of every worker taking them all; on CUDA too, where the CPU threads
    collate batches and run the data loaders (torchrun sets 1). On this 2-core machine a 2-process run of
    the tests' tiny model took 5.4 s instead of 6.7 s."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nprocs))
    try:
        yield
    finally:
        del os.environ["OMP_NUM_THREADS"]


@contextmanager
def _quiet_launcher_logs() -> Iterator[None]:
    """Silence torchelastic's own logging: its failure reports repeat what `launch_workers` raises."""
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _in_group():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# gathers and broadcasts of Python objects


def gather_to_main(obj: T) -> Optional[list[T]]:
    """Every rank's `obj`, in rank order, on rank 0; None on the other ranks."""
    if not _in_group():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_main(obj: Optional[T]) -> T:
    """Rank 0's `obj` on every rank."""
    if not _in_group():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag OR-ed over all ranks (as is in one process), so every rank takes the same branch."""
    if not _in_group():
        return [bool(f) for f in flags]
    values = torch.tensor([float(f) for f in flags], dtype=torch.float32, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def main_result(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run `fn` on rank 0 and return its result on every rank.

    If `fn` raises, every rank raises: a `DpokitError` with the same message (so a user error found
    on rank 0 stops the whole run cleanly instead of leaving the other ranks waiting).
    """
    if not _in_group():
        return fn(*args, **kwargs)
    outcome: Optional[tuple[str, Any]] = None
    error: Optional[BaseException] = None
    if dist.get_rank() == 0:
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except Exception as exc:
            error = exc
            outcome = ("error", str(exc) if isinstance(exc, DpokitError) else f"rank 0 failed: {exc!r}")
    kind, value = broadcast_from_main(outcome)
    if error is not None:
        raise error
    if kind == "error":
        raise DpokitError(value)
    return value
