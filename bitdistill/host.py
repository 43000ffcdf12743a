"""What the host machine can still give this process (read before work that would not fit)."""

from __future__ import annotations

__all__ = ["available_host_bytes"]


def available_host_bytes() -> int:
    """Memory the OS can still give this process (psutil's ``available``: ``MemAvailable`` on Linux; psutil comes
    with accelerate)."""
    import psutil

    return int(psutil.virtual_memory().available)
