"""How much dpokit prints: one level for the process and the workers it starts.

``dpokit --log-level LEVEL`` (or ``DPOKIT_LOG_LEVEL``; ``--debug`` is the debug level) sets it:

- ``error``: only errors;
- ``warning``: also the notes (a fallback taken, a damaged checkpoint skipped, ...);
- ``info`` (the default): also progress bars, tables and summaries, the console output as it always was;
- ``debug``: also what dpokit decided and why (the resolved config, the recipe command line, the
  attention layout), and the full chain of causes under every one-line error.

Messages go through the standard ``logging`` logger ``"dpokit"``, so a program that imports dpokit can
route them; rich tables and progress bars go to `console`, which is silent below the info level.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

from rich.console import Console
from rich.markup import escape

from dpokit.errors import DpokitError

ENV = "DPOKIT_LOG_LEVEL"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
logger = logging.getLogger("dpokit")


class _ConsoleHandler(logging.Handler):
    """Notes and debug lines on stderr as dpokit has always shown them (``note: ...`` in yellow)."""

    def emit(self, record: logging.LogRecord) -> None:
        message = escape(record.getMessage())
        if record.levelno >= logging.WARNING:
            message = f"[yellow]note:[/] {message}"
        elif record.levelno < logging.INFO:
            message = f"[dim]debug: {message}[/]"
        Console(stderr=True).print(message, highlight=False, soft_wrap=True)


def level_name() -> str:
    """The process's level: set by `set_level`, else ``DPOKIT_LOG_LEVEL``, else info."""
    name = os.environ.get(ENV, "info").strip().lower()
    return name if name in LEVELS else "info"  # `check_environment` says what is wrong with it


def check_environment() -> None:
    """Refuse a ``DPOKIT_LOG_LEVEL`` that is not a level (once, before a command runs)."""
    name = os.environ.get(ENV, "info").strip().lower()
    if name not in LEVELS:
        raise DpokitError(f"{ENV}={os.environ[ENV]!r} is not a log level; choose one of: {', '.join(LEVELS)}")


def set_level(name: str) -> None:
    """Use level `name` here and in every process started from here (it is put in the environment)."""
    if name.lower() not in LEVELS:
        raise DpokitError(f"--log-level {name!r} is not a log level; choose one of: {', '.join(LEVELS)}")
    os.environ[ENV] = name.lower()
    configure()


@contextlib.contextmanager
def level_restored() -> Iterator[None]:
    """Put the environment's level back afterwards (a command run in-process, as tests do, sets it)."""
    before = os.environ.get(ENV)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
        configure()


def configure() -> None:
    """Attach the console handler to the ``dpokit`` logger (once) at the environment's level."""
    if not any(isinstance(handler, _ConsoleHandler) for handler in logger.handlers):
        logger.addHandler(_ConsoleHandler())
        logger.propagate = False
    logger.setLevel(LEVELS[level_name()])


def enabled(name: str) -> bool:
    """Whether messages of level `name` are shown."""
    return LEVELS[level_name()] <= LEVELS[name]


def console(stderr: bool = False) -> Console:
    """A rich console for tables, summaries and progress: silent below the info level."""
    return Console(stderr=stderr, quiet=not enabled("info"))


def note(message: str) -> None:
    """A warning-level note: something the user should know that does not stop the command."""
    configure()
    logger.warning(message)


def debug(message: str) -> None:
    """A debug-level line: what dpokit decided and why."""
    configure()
    logger.debug(message)


def print_causes(exc: BaseException) -> None:
    """At the debug level: the traceback of `exc` with every exception that caused it (under a one-line error)."""
    if enabled("debug"):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
