"""The hash of the native CPU sources in ``csrc/cpu/``: ``setup.py`` compiles it into ``bitdistill._cpu`` and
:mod:`bitdistill.cpu_ext` compares it with a checkout's sources to tell a stale build. Standard library only:
``setup.py`` loads this file by path, before bitdistill or its dependencies are importable."""

from __future__ import annotations

import hashlib
from pathlib import Path


def cpu_source_hash(csrc_cpu: Path) -> str:
    """First 16 hex digits of the SHA-256 of every ``*.c`` / ``*.h`` file in ``csrc_cpu`` (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(csrc_cpu.glob("*.[ch]")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
