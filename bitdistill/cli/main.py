"""``bitdistill`` console script.

Each subcommand lives in ``bitdistill/cli/<name>.py`` and defines ``add_arguments(parser)`` and
``run(args) -> int``; it only parses arguments and calls library functions. Only the chosen subcommand's
module is imported (``COMMANDS`` holds every name and one-line help), so ``bitdistill --help`` and
``--version`` import neither torch nor transformers. Flags are spelled with underscores everywhere
(``--gguf_file``, as ``HfArgumentParser`` spells dataclass fields); the dashed spellings are accepted and
not listed. Errors the user can fix (:class:`bitdistill.errors.UserError`, missing or existing files, a full disk or a
read-only location) print one line on stderr and exit 2; Ctrl-C prints one line and exits 130 (SIGTERM: 143),
after every output being written has been removed. Programming errors keep their traceback. Set
``BITDISTILL_DEBUG=1`` for the traceback of a user error too. The training commands keep freed heap memory in
the process (:func:`bitdistill.allocator.keep_freed_memory`; faster, same results; ``BITDISTILL_KEEP_FREED_MEMORY=0``
leaves the allocator alone). :func:`main` called in-process (tests) does so for the calling process too. They also
default ``OMP_WAIT_POLICY`` to ``PASSIVE`` before torch is imported: under load, OpenMP threads spinning at barriers
burn process CPU time, which is what ``--time_budget`` counts.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterable

from bitdistill.allocator import keep_freed_memory
from bitdistill.errors import Terminated, UserError, user_error_from_os

# name: (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("bitdistill.cli.convert",
        'Convert a causal LM (folder, hub id, GGUF, or tiny:<arch>) into a BitNet b1.58 student folder.'),
    "pack": ("bitdistill.cli.pack",
        ('Pack a BitNet student folder (or, with --from_plain / --gguf_file, any causal LM) into 1.58-bit '
         'packed safetensors that transformers loads.')),
    "unpack": ("bitdistill.cli.unpack",
        ('Unpack a packed bitnet folder into a float32 BitNet student folder (latent weights T*gamma) to '
         'train on.')),
    "distill": ("bitdistill.cli.distill",
        ('Distill a teacher (folder, hub id, GGUF) into a BitNet b1.58 student; every option is also a key'
         ' of --config FILE (YAML/JSON). Training options are transformers.TrainingArguments.')),
    "cache-teacher": ("bitdistill.cli.cache_teacher",
        ("Write the teacher's top-k log-probabilities (and the tail mass) on the training blocks to "
         'safetensors shards; `bitdistill distill --teacher_cache DIR` then trains without the teacher.')),
    "self-distill": ("bitdistill.cli.self_distill",
        ('Train a causal LM (pretrained or from a config, full precision or --bitnet) with exits after its'
         ' blocks and the self-distillation loss; every option is also a key of --config FILE (YAML/JSON).'
         ' Data options are those of `bitdistill distill`, training options '
         'transformers.TrainingArguments.')),
    "eval": ("bitdistill.cli.eval",
        ('Evaluate a model (plain/GGUF teacher, BitNet student folder or packed folder) on lm-eval tasks, '
         "e.g. the offline wikitext_lastword (needs pip install 'bitdistill[eval]').")),
    "recover": ("bitdistill.cli.recover",
        ('Distill a teacher into a BitNet b1.58 student with the staged recipe (calibrated ternary init, '
         'block-wise reconstruction, end-to-end KD) within --time_budget of process CPU time; takes every '
         '`distill` option and --config FILE.')),
    "plan": ("bitdistill.cli.plan",
        ('Can TEACHER be distilled into a ternary student on N GPUs of M GB? Per-rank memory (teacher, latent '
         'weights, gradients, optimizer, activations) from its config alone, and the options that fit.')),
    "generate": ("bitdistill.cli.generate",
        ('Continue prompts with a teacher, student or packed folder (or a GGUF file): greedy or sampled, streamed '
         'to stdout, through the fast decoder where it applies.')),
}
SUBCOMMANDS = tuple(COMMANDS)
# Commands that train: they keep freed heap memory (bitdistill.allocator) for speed.
TRAINING_COMMANDS = ("distill", "recover", "self-distill", "cache-teacher")

USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


class OneSpellingFormatter(argparse.HelpFormatter):
    """Lists ``--a_b`` but not its accepted alias ``--a-b``."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        strings = action.option_strings
        shown = [s for s in strings if not (s.startswith("--") and "-" in s[2:] and "--" + s[2:].replace("-", "_")
                                            in strings)]
        if len(shown) == len(strings):
            return super()._format_action_invocation(action)
        action.option_strings = shown
        try:
            return super()._format_action_invocation(action)
        finally:
            action.option_strings = strings


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``bitdistill`` parser; only the subcommands in ``commands`` (default: all) get their arguments,
    so only their modules are imported. Every subcommand is listed in ``--help`` either way."""
    chosen = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(prog="bitdistill", description="BitNet b1.58 toolkit for Hugging Face causal LMs.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=OneSpellingFormatter)
        if name in chosen:
            module = importlib.import_module(module_name)
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
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command in TRAINING_COMMANDS:  # before torch loads OpenMP: spinning threads of a loaded machine burn the
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # CPU budget (a set value is kept)
    args = build_parser([command] if command else []).parse_args(argv)
    debug = bool(os.environ.get("BITDISTILL_DEBUG"))
    if args.command in TRAINING_COMMANDS:
        keep_freed_memory()
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
