"""``bitdistill`` console script.

Each subcommand lives in ``bitdistill/cli/<name>.py`` and defines ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; it only parses arguments and calls library
functions. Errors the user can fix (:class:`bitdistill.errors.UserError`, missing or existing files, a
full disk or a read-only location) print one line on stderr and exit 2; Ctrl-C prints one line and exits
130 (SIGTERM: 143), after every output being written has been removed. Programming errors keep their
traceback. Set ``BITDISTILL_DEBUG=1`` for the traceback of a user error too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from bitdistill.errors import Terminated, UserError, user_error_from_os

SUBCOMMANDS = ("convert", "pack", "unpack", "distill", "cache-teacher", "self-distill", "eval")

USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitdistill", description="BitNet b1.58 toolkit for Hugging Face causal LMs.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"bitdistill.cli.{name.replace('-', '_')}")
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from bitdistill._version import __version__

    return f"bitdistill {__version__}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(os.environ.get("BITDISTILL_DEBUG"))
    previous = signal.signal(signal.SIGTERM, _sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        name = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"bitdistill {args.command}: {name}; outputs being written were removed", file=sys.stderr)
        return 128 + (Terminated.signum if isinstance(exc, Terminated) else signal.SIGINT)
    except (*USER_ERRORS, OSError) as exc:
        user = exc if isinstance(exc, USER_ERRORS) else user_error_from_os(exc)
        if user is None or debug:
            raise
        print(f"bitdistill {args.command}: error: {_one_line(user)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
