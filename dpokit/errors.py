"""The one exception type users see: a message that names what is wrong and how to fix it."""


class DpokitError(Exception):
    """A user-facing error; the CLI prints its message as one red line (traceback with --debug)."""

    exit_code = 1
