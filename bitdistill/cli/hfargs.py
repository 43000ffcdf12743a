"""Dataclass arguments (``HfArgumentParser``) inside a ``bitdistill`` subcommand, plus ``--config FILE``.

Every dataclass field becomes a flag of the subcommand; ``--config`` reads a YAML or JSON file of the
same keys, and flags given on the command line override the file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shlex
from pathlib import Path

from bitdistill.errors import UserError

__all__ = ["add_dataclass_arguments", "command_from_args", "parse_dataclasses"]


def add_dataclass_arguments(parser: argparse.ArgumentParser, dataclass_types: tuple,
                            only: frozenset[str] | None = None, defaults: dict | None = None) -> None:
    """Add every field of ``dataclass_types`` (or only the fields named in ``only``) as a flag of ``parser``
    (absent flags stay absent, so the command's ``defaults`` or else the dataclass defaults apply, see
    :func:`parse_dataclasses`; the help of a flag in ``defaults`` names its value), and ``--config``."""
    from transformers import HfArgumentParser

    hf = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="YAML or JSON file of options (the flags' names without '--'); flags override it")
    for action in hf._actions:
        if isinstance(action, argparse._HelpAction) or (only is not None and action.dest not in only):
            continue
        action.default = argparse.SUPPRESS
        action.required = False
        if defaults and action.dest in defaults:
            action.help = f"{action.help or ''} (default: {defaults[action.dest]})".lstrip()
        parser._add_action(action)


def parse_dataclasses(args: argparse.Namespace, dataclass_types: tuple, defaults: dict | None = None) -> tuple:
    """Build the dataclasses from the parsed flags merged over ``--config``'s keys, merged over ``defaults``
    (a command's own defaults for fields of ``dataclass_types``; fields in none of the three keep the
    dataclasses' defaults). A ``recipe_defaults`` field, where one of the dataclasses has it, lists the keys of
    ``defaults`` that neither the file nor a flag set (so a default recipe part can be told from one asked for)."""
    import yaml
    from transformers import HfArgumentParser

    values: dict = {}
    config = getattr(args, "config", None)
    if config:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"--config file {path} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
            values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
            detail = " ".join(str(exc).split())
            raise UserError(f"--config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                            f"({detail}); fix the file") from exc
        if not isinstance(values, dict):
            raise UserError(f"--config file {path} must hold a mapping of option names to values")
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "command", "_run")}
    given = {**values, **flags}
    values = {**copy.deepcopy(defaults or {}), **given}  # the parsed lists are not the defaults'
    if defaults and "recipe_defaults" not in given and any(
            f.name == "recipe_defaults" for t in dataclass_types for f in dataclasses.fields(t)):
        values["recipe_defaults"] = sorted(k for k in defaults if k not in given)
    try:
        return HfArgumentParser(dataclass_types).parse_dict(values)
    except ValueError as exc:  # unknown keys, from HfArgumentParser
        where = f"--config file {config}" if config else "the options"
        raise UserError(f"{where}: {' '.join(str(exc).split())}; fix the option names and values") from exc


def command_from_args(args: argparse.Namespace) -> str:
    """The options the user gave (``--config`` included), as an equivalent shell command."""
    parts = ["bitdistill", args.command]
    for key, value in vars(args).items():
        if key in ("command", "_run"):
            continue
        parts.append(f"--{key}")
        parts.extend(str(v) for v in value) if isinstance(value, list) else parts.append(str(value))
    return " ".join(shlex.quote(p) for p in parts)
