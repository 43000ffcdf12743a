"""What the host machine can still give this process (read before work that would not fit)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["available_host_bytes", "cpu_has_bf16"]


def available_host_bytes() -> int:
    """Memory the OS can still give this process (psutil's ``available``: ``MemAvailable`` on Linux; psutil comes
    with accelerate)."""
    import psutil

    return int(psutil.virtual_memory().available)


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (``avx512_bf16`` or ``amx_bf16`` among the flags of
    ``cpuinfo``); False where the file is absent (not Linux) or has no such flag."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags
