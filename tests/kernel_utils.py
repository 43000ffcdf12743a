"""Shared helpers of the kernel tests: device choice, named tolerances, tie construction."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Relative tolerances, per output dtype, for results of float math (GEMM outputs and gradients),
#: applied as ``atol = RTOL[dtype] * max|ref|``. float32 kernels use IEEE float32 products (GPU matmul
#: blocking only reorders sums); bf16/fp16 allow about two units in the last place of the output dtype
#: (the Triton interpreter converts float32 -> bfloat16 by truncation, the GPU and torch round to nearest).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """``out`` matches ``ref`` within :data:`RTOL` of ``dtype``; every element written (no NaN)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out).any(), "output has NaN: an element was not written"
    o, r = out.float().cpu(), ref.float().cpu()
    tol = RTOL[dtype]
    torch.testing.assert_close(o, r, rtol=tol, atol=tol * max(r.abs().max().item(), 1e-6))


def nan_like(shape, dtype, device=DEVICE) -> torch.Tensor:
    """A buffer poisoned with NaN (or 77 for integer dtypes) so unwritten elements show."""
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, 77, dtype=dtype, device=device)


def rows_with_ties(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """``[m, k]`` activations where ``x * s_x`` lands exactly on ``j + 0.5`` for random odd and even ``j``.

    Row ``i`` has absmax ``127 / 2**(3 + i % 4)`` (column 0), so ``s_x = 2**(3 + i % 4)`` exactly, and the other
    entries are ``(j + 0.5) / s_x``, exact in every float dtype (at most 8 significant bits).
    """
    g = torch.Generator().manual_seed(1)
    x = torch.empty(m, k, dtype=torch.float64)
    for i in range(m):
        s = 2.0 ** (3 + i % 4)
        x[i, 0] = 127 / s
        x[i, 1:] = (torch.randint(-126, 126, (k - 1,), generator=g).double() + 0.5) / s
    return x.to(dtype)
