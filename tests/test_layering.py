"""Imports go only downward: a module never imports (even lazily, inside a function) a module of a higher layer.

The layers, lowest first, and what may import what, are documented in ``docs/architecture.md``; this test is
their definition. Modules of the same layer may import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module's layer is that of its longest listed prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("bitdistill._lazy", "bitdistill._version", "bitdistill.errors", "bitdistill.io", "bitdistill.weights",
              "bitdistill.host", "bitdistill.quant", "bitdistill.models", "bitdistill.data", "bitdistill.state_dict")),
    ("ops", ("bitdistill.ops", "bitdistill.cpu_ext", "bitdistill._native_hash", "bitdistill._cpu", "bitdistill.cuda_ext",
             "bitdistill._C", "bitdistill.kernels")),
    ("nn", ("bitdistill.nn",)),
    ("convert/export", ("bitdistill.convert", "bitdistill.export")),
    ("runs", ("bitdistill.allocator", "bitdistill.audit", "bitdistill.budget", "bitdistill.checkpoints", "bitdistill.fsdp",
              "bitdistill.live_memory", "bitdistill.plan", "bitdistill.runs", "bitdistill.validate")),
    ("distill/selfdistill/eval", ("bitdistill.distill", "bitdistill.selfdistill", "bitdistill.eval",
                                  "bitdistill.recover")),
    ("cli", ("bitdistill.cli",)),
]
# Compiled modules (no .py file): the optional CUDA extension built from csrc/, the CPU library from csrc/cpu/.
EXTENSIONS = {"bitdistill._C", "bitdistill._cpu"}
# The package root is the public facade: it names every layer's API (lazily) and is imported by no module.
FACADE = "bitdistill"


def _modules() -> dict[str, Path]:
    found = {}
    for base, pkg in ((ROOT / "bitdistill", "bitdistill"),):
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((pkg, *parts))] = path
    return found


def layer_of(module: str) -> int:
    """Index into ``LAYERS`` of ``module`` (a dotted ``bitdistill`` name)."""
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise KeyError(f"{module} is in no layer; add it to LAYERS and docs/architecture.md")
    return rank


def imported_modules(module: str, path: Path) -> set[str]:
    """Every ``bitdistill`` module ``path`` imports, at any depth of the file (``from x import y`` counts ``x.y``
    when ``x.y`` is a module, else ``x``)."""
    known = set(_modules()) | EXTENSIONS
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m == FACADE or m.startswith(FACADE + ".")}


MODULES = sorted(_modules().items())


def test_every_module_has_a_layer():
    for module, _ in MODULES:
        if module != FACADE:
            layer_of(module)


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_imports_only_go_down(module, path):
    if module == FACADE:
        return
    mine = layer_of(module)
    bad = []
    for target in sorted(imported_modules(module, path)):
        if target == FACADE:
            bad.append(f"{target} (the facade; import the defining module)")
        elif layer_of(target) > mine:
            bad.append(f"{target} (layer {LAYERS[layer_of(target)][0]})")
    assert not bad, f"{module} (layer {LAYERS[mine][0]}) imports higher layers: {', '.join(bad)}"


def test_the_checker_catches_an_upward_import(tmp_path):
    bad = tmp_path / "fake.py"
    bad.write_text("def f():\n    from bitdistill.distill.losses import divergence\n")
    targets = imported_modules("bitdistill.nn.fake", bad)
    assert "bitdistill.distill.losses" in targets
    assert layer_of("bitdistill.distill.losses") > layer_of("bitdistill.nn.fake")
