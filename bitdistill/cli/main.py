"""``bitdistill`` console script.

Each subcommand lives in ``bitdistill/cli/<name>.py`` and defines ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; it only parses arguments and calls library
functions. Errors the user can fix (bad input, missing files) print one line on stderr and exit 2;
set ``BITDISTILL_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = ("convert", "pack", "unpack", "distill", "cache-teacher", "self-distill", "eval")

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, TypeError, KeyError)


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as exc:
        if os.environ.get("BITDISTILL_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"bitdistill {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
