"""One writer per run directory or cache: a lock file naming its owner (host, pid, command).

`WriterLock.acquire` creates the lock file exclusively. A second writer is refused with who holds
the lock; a lock left by a process that no longer exists on this host is taken over with a note.
A lock held on another host cannot be checked from here: the message says how to remove it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from dpokit import log
from dpokit.errors import DpokitError


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_path(artifact: Path, name: Optional[str] = None) -> Path:
    """The lock file of `artifact`, keyed by the file it resolves to (not the name it was given), so two
    writers reaching one cache or run through different paths or a symlink meet at one lock: beside the
    resolved file (``ref.h5.lock``), or inside the resolved folder as `name` (``RUN/.dpokit.lock``)."""
    resolved = Path(os.path.realpath(artifact))
    return resolved / name if name else resolved.with_name(resolved.name + ".lock")


class WriterLock:
    """An exclusive lock file at `path` for the artifact described by `what` (used in messages)."""

    def __init__(self, path: Path, what: str, announce: Optional[Callable[[str], None]] = None):
        self.path = Path(path)
        self.what = what
        self.announce = announce or log.note
        self.held = False

    def owner(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": " ".join(sys.argv)[:500],
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def acquire(self) -> "WriterLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(self.owner(), handle)
            self.held = True
            return self
        raise DpokitError(f"cannot take the lock {self.path} for {self.what}; another writer keeps taking it")

    def _take_over_or_refuse(self) -> None:
        try:
            text = self.path.read_text()
        except OSError:
            text = ""
        try:
            holder = json.loads(text or "{}")
        except json.JSONDecodeError:
            holder = None
        if not isinstance(holder, dict):  # not a lock dpokit wrote: not ours to delete
            raise DpokitError(
                f"{self.path} is in the way of {self.what}'s lock but is not a dpokit lock (its content does not parse); "
                "if no dpokit command is writing there, delete it and run again"
            )
        host, pid = holder.get("host"), holder.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not process_alive(pid):
            self.announce(f"taking over {self.path}: its owner (pid {pid}) no longer runs")
            self.path.unlink(missing_ok=True)
            return
        if not holder:  # being written this very moment, or emptied: give the writer a moment
            time.sleep(0.2)
            if self.path.exists() and not self.path.read_text().strip():
                self.path.unlink(missing_ok=True)
            return
        raise DpokitError(
            f"{self.what} is being written by another dpokit process (pid {pid} on {host}, since "
            f"{holder.get('since', '?')}: {holder.get('command', '?')}); wait for it to finish or use another "
            f"output. If that process is gone, delete {self.path}"
        )

    def release(self) -> None:
        if not self.held:
            return
        try:
            holder = json.loads(self.path.read_text())
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass
        self.held = False

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
