"""Progress lines of the library (``logging.getLogger("bitdistill")``, level INFO) on the console."""

from __future__ import annotations

import logging
import sys

__all__ = ["show_progress"]

_HANDLER_NAME = "bitdistill-console"


class _StdoutHandler(logging.StreamHandler):
    """A stream handler on whatever ``sys.stdout`` is when a line is written (it may be replaced meanwhile)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def show_progress(command: str) -> None:
    """Print the ``bitdistill.*`` loggers' INFO lines on stdout as ``[bitdistill <command>] message`` (once per process;
    stderr stays for the one-line errors)."""
    log = logging.getLogger("bitdistill")
    log.setLevel(logging.INFO)
    if not any(h.get_name() == _HANDLER_NAME for h in log.handlers):
        handler = _StdoutHandler()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter(f"[bitdistill {command}] %(message)s"))
        log.addHandler(handler)
