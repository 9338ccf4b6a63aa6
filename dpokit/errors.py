"""The one exception type users see: a message that names what is wrong and how to fix it (and the one line
that file-system errors a user can act on become)."""

from __future__ import annotations

import errno
import os
from typing import Optional


class DpokitError(Exception):
    """A user-facing error; the CLI prints its message as one red line (traceback with --debug)."""

    exit_code = 1


FILESYSTEM_HINTS = {
    errno.ENOSPC: "the disk is full: free space (or choose another --out) and run the command again; "
    "an interrupted cache or run resumes",
    errno.EDQUOT: "the disk quota is used up: free space (or choose another --out) and run the command again",
    errno.EROFS: "the file system is read-only: choose an --out on a writable one",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f): raise the limit or choose another --out",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another --out",
    errno.EEXIST: "a file of that name is in the way (a folder was expected): choose another --out",
    errno.EACCES: "permission denied: choose a path you may write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a path you may write, or fix its permissions",
}


def filesystem_error_line(exc: OSError) -> Optional[str]:
    """One line for a file-system error the user can act on (full disk, read-only, a file in the way, ...),
    naming the path and the fix; None for any other OSError (its traceback is the useful report)."""
    hint = FILESYSTEM_HINTS.get(exc.errno)
    if hint is None or not exc.filename:
        return None
    return f"{exc.filename}: {exc.strerror or os.strerror(exc.errno)}; {hint}"
