"""Shared fixtures. Tests need no network; GPU tests are skipped without CUDA.

Without a GPU, Triton kernels run under ``TRITON_INTERPRET=1``, which must be set before Triton is
imported: it is set here, before any test module imports ``bitdistill.kernels``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# No bytecode caches in the checkout, from this process or the CLI subprocesses tests start (set before the
# package under test is imported).
sys.dont_write_bytecode = True
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# Written by Python and pytest themselves, not by the code under test.
_TOOL_DIRS = ("__pycache__", ".pytest_cache", ".ruff_cache")


def _checkout_state() -> set[str] | None:
    """The checkout's untracked and ignored entries (``git status``) and top-level names; ``None`` outside git."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    top = {f"top-level {p.name}" for p in ROOT.iterdir()}  # git does not list empty folders
    new_files = [line for line in out.splitlines() if line.startswith(("??", "!!"))]  # not edits to tracked files
    return {line for line in [*new_files, *top] if not any(d in line for d in _TOOL_DIRS)}


def pytest_sessionstart(session):
    session.config._checkout_before = _checkout_state()


def pytest_sessionfinish(session, exitstatus):
    """Tests leave nothing in the checkout (``runs/``, ``build/``, ``*.egg-info``, ...): fail the run if they did."""
    before = getattr(session.config, "_checkout_before", None)
    after = _checkout_state()
    if before is None or after is None:
        return
    new = sorted(after - before)
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "the test run changed the checkout (use tmp_path): " + ", ".join(new)
        if reporter is not None:
            reporter.write_sep("=", message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository (WikiText-2, tokenizers); skips if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA
