"""Stopping a run cleanly: SIGTERM (a scheduler's preemption) and Ctrl-C checkpoint before exit.

The first SIGTERM or SIGINT only records a request; the training loop finishes its current step,
every rank agrees on the stop (`dpokit.distributed.any_rank`), a checkpoint is written, and the run exits with
`INTERRUPTED_EXIT_CODE` and the command that resumes it. A second SIGINT (Ctrl-C again) exits at once.
Repeated SIGTERMs (SLURM may signal every process of a job step, and torchrun forwards the signal
to its workers as well) count as one request.
"""

from __future__ import annotations

import signal
from typing import Callable, Optional

from dpokit import log
from dpokit.errors import DpokitError

INTERRUPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" -- the run stopped with a checkpoint to resume from


class TrainingInterrupted(DpokitError):
    """The run stopped on a signal after writing a checkpoint; ``exit_code`` tells schedulers to requeue."""

    exit_code = INTERRUPTED_EXIT_CODE


class StopSignals:
    """Records SIGTERM/SIGINT as a stop request instead of dying mid-step (main thread only)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: Optional[Callable[[str], None]] = None):
        self.requested: Optional[str] = None
        self.announce = announce or log.note
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the default behaviour
                pass
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
            return
        self.requested = name
        self.announce(
            f"received {name}: finishing the current step, then writing a checkpoint (Ctrl-C again to stop at once)"
        )
