"""Packaging: bitdistill.kernels is this repo's bitdistill/kernels/ in editable and regular installs, a top-level
``kernels`` is never this repo's (it would shadow Hugging Face's), and import is light."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **kwargs) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          **kwargs).stdout.strip()


def test_import_bitdistill_imports_no_triton_or_cuda_only_code():
    out = _run("import sys, bitdistill; "
               "print(sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'bitdistill') and "
               "(m.startswith('triton') or m.startswith('bitdistill.kernels') or m == 'bitdistill._C')))")
    assert out == "[]"


def test_kernels_resolve_to_this_repo_in_the_editable_install():
    out = _run("import bitdistill.kernels as k; print(k.__file__)", cwd="/")
    assert Path(out).resolve() == (ROOT / "bitdistill" / "kernels" / "__init__.py").resolve()


def test_the_repository_root_holds_no_kernels_package():
    """With the root on sys.path (``python -m pytest``, ``python -c`` in the checkout) ``import kernels`` must find
    Hugging Face's package (transformers >= 5.25 imports it), never a folder of this repository."""
    out = _run("import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')", cwd=ROOT)
    assert not out or Path(out).resolve().parents[1] != ROOT, out  # e.g. .venv/.../site-packages/kernels


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "bitdistill").rglob("__init__.py")}
    assert found == listed


def test_regular_install_ships_kernels_as_bitdistill_kernels(tmp_path):
    # setuptools builds in the source tree (build/, *.egg-info): build from a copy, so the checkout stays clean
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                             ".*_cache", "benchmarks", "tests", "runs", "*.so"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, capture_output=True)
    out = _run("import bitdistill.kernels as k; print(k.__file__)", cwd=str(tmp_path),
               env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert Path(out).resolve() == (target / "bitdistill" / "kernels" / "__init__.py").resolve()
    assert (ROOT / "bitdistill" / "kernels" / "__init__.py").read_bytes() == Path(out).read_bytes()
    # The native CPU library is built by the install itself (the one build path, setup.py), and it loads.
    assert list((target / "bitdistill").glob("_cpu*.so"))
    out = _run("from bitdistill import cpu_ext; print(cpu_ext.native_available(), cpu_ext.native_unavailable_reason())",
               cwd=str(tmp_path), env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out == "True", out
