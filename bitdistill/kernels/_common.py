"""Helpers shared by the Triton kernels: exact rounding, launch checks, interpreter-aware configs."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: Floating dtypes the kernels read and write; anything else goes to the reference path in ``ops``.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def round_half_even(x):
    """Round float32 ``x`` to the nearest integer, ties to even (``torch.round``), for ``|x| < 2**22``.

    Adding and subtracting ``1.5 * 2**23`` leaves no fraction bits, so the hardware's round-to-nearest-even
    does the rounding. Callers clamp first (which also keeps the add from being fused into an FMA).
    """
    return (x + 12582912.0) - 12582912.0


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (CPU tensors, numpy semantics, no autotuning)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor, where: str) -> None:
    """Kernels run on CUDA tensors (or CPU tensors under the interpreter), all on one device."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{where}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{where}: the Triton kernels need CUDA tensors, got {device}; use the reference "
                         "implementation in bitdistill.quant on CPU (or set TRITON_INTERPRET=1 to interpret)")


def check_float(t: torch.Tensor, name: str, where: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{where}: {name} must be float32, bfloat16 or float16, got {t.dtype}; "
                        "cast it first or use the reference path (BITDISTILL_BACKEND=reference)")


def check_out(out: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device, name: str,
              where: str) -> torch.Tensor:
    """Validate a caller-provided output buffer (written in full by the kernel)."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"{where}: out buffer {name} must be a contiguous {dtype} tensor of shape {tuple(shape)} "
                         f"on {device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
                         f"{'' if out.is_contiguous() else ' (non-contiguous)'}")
    return out


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride on its last dim and dense rows (a copy only when needed)."""
    return t if t.is_contiguous() else t.contiguous()


def configs(gpu: list[triton.Config], interpret: triton.Config) -> list[triton.Config]:
    """Autotuning candidates on a GPU; a single small config under the interpreter.

    ``BITDISTILL_TRITON_AUTOTUNE=0`` keeps only the first GPU config (fast start, e.g. for tests).
    """
    if interpreting():
        return [interpret]
    return gpu[:1] if os.environ.get("BITDISTILL_TRITON_AUTOTUNE", "1") == "0" else gpu
