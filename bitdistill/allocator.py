"""Keep freed heap memory in a training process (glibc ``malloc`` tuning).

A training step allocates and frees the same activation-sized buffers every step. glibc's defaults give large
buffers back to the kernel when they are freed (``mmap``/``munmap`` above a threshold that starts at 128 KiB,
heap trimming above 128 KiB free at the top; both thresholds then adapt), so the next step touches fresh pages
and takes a minor page fault for each 4 KiB of them: on a small model's KD step the kernel's share of the CPU
time can be large (measurements: benchmarks/results/distill_smollm2_notes.md). Under contention (two trainings sharing two cores) it falls unevenly: a process whose
heap has already grown pays less.

:func:`keep_freed_memory` sets three ``mallopt`` parameters for the rest of the process, the ones the
``MALLOC_*_`` environment variables set at start:

* ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's largest on 64-bit; 16 MiB on 32-bit): blocks up to it come from the
  heap, not from a fresh mapping; larger ones (a large vocabulary's logits) are still mapped and unmapped;
* ``M_TRIM_THRESHOLD`` = 2 GiB - 1 (the largest ``mallopt`` takes): up to that much free memory at the top of
  the heap is kept rather than returned;
* ``M_TOP_PAD`` = 1 GiB: the heap grows in large steps.

It changes where buffers live, never what is computed: results are bit-identical. The cost is that the
process's resident memory stays near its peak. The console script applies it to its training commands
(``distill``, ``recover``, ``self-distill``, ``cache-teacher``). It is left alone when the user chose:
``BITDISTILL_KEEP_FREED_MEMORY=0``, any of ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_``, ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``, or another
allocator in ``LD_PRELOAD`` (jemalloc, tcmalloc, mimalloc).
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["KEEP_FREED_MEMORY", "OPT_OUT", "keep_freed_memory", "user_chose_allocator"]

OPT_OUT = "BITDISTILL_KEEP_FREED_MEMORY"  # set to 0 to leave the allocator alone
# mallopt parameter numbers (glibc malloc.h) and the values set.
_PARAMS = {"M_MMAP_THRESHOLD": -3, "M_TRIM_THRESHOLD": -1, "M_TOP_PAD": -2}
KEEP_FREED_MEMORY = {"M_MMAP_THRESHOLD": 4 * 2**20 * ctypes.sizeof(ctypes.c_long),
                     "M_TRIM_THRESHOLD": 2**31 - 1, "M_TOP_PAD": 2**30}
_USER_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def user_chose_allocator(environ: dict[str, str] | None = None) -> bool:
    """Whether ``environ`` (default ``os.environ``) opts out or already configures the allocator."""
    env = os.environ if environ is None else environ
    return (env.get(OPT_OUT) == "0" or any(name in env for name in _USER_MALLOC_VARIABLES)
            or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")
            or any(name in env.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS))


def keep_freed_memory() -> dict[str, int] | None:
    """Set :data:`KEEP_FREED_MEMORY` with glibc's ``mallopt`` for this process.

    Returns the settings glibc accepted (a setting it refuses is skipped), or ``None`` when nothing was changed:
    not glibc (macOS, Windows, musl), or :func:`user_chose_allocator`. Never raises.
    """
    if not sys.platform.startswith("linux") or user_chose_allocator():
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and other C libraries
        return None
    applied = {key: value for key, value in KEEP_FREED_MEMORY.items()
               if libc.mallopt(_PARAMS[key], ctypes.c_int(value)) == 1}
    return applied or None
