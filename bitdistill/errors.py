"""The exception types the CLI turns into one-line messages.

A :class:`UserError` is a failure the user caused or can fix (a bad flag, a missing or corrupt file, a full
disk); its message names the file or flag and the fix. Every other exception is a programming error and
keeps its traceback. :class:`UserError` subclasses ``ValueError`` so callers that caught ``ValueError``
before keep working.
"""

from __future__ import annotations

import errno
import os

__all__ = ["Terminated", "UserError", "user_error_from_os"]


class UserError(ValueError):
    """A failure the user can fix; the message is one line naming the file or flag and the fix."""


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM (so cleanup runs as for Ctrl-C)."""

    signum = 15


_FIXES = {
    errno.ENOSPC: "free some space or write to another disk",
    errno.EDQUOT: "free some space (disk quota exceeded) or write to another disk",
    errno.EROFS: "choose a writable location",
    errno.EACCES: "choose a location you may write to (or fix its permissions)",
    errno.EPERM: "choose a location you may write to (or fix its permissions)",
    errno.ENAMETOOLONG: "use a shorter path",
}


def user_error_from_os(exc: OSError, path: str | os.PathLike | None = None) -> UserError | None:
    """A :class:`UserError` for an ``OSError`` a user can fix (full disk, read-only, permission), else ``None``.

    Args:
        exc: the error raised by a write.
        path: the output the write belonged to (named in the message); ``exc.filename`` when ``None``.
    """
    fix = _FIXES.get(exc.errno)
    if fix is None:
        return None
    where = path if path is not None else (exc.filename or "the output")
    return UserError(f"cannot write {where}: {os.strerror(exc.errno)}; {fix}")
