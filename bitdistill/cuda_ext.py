"""Optional CUDA C++ extension ``bitdistill._C`` (sources in ``csrc/``): the W2A8 packed decode kernel.

The extension is compiled by ``pip install`` from a source checkout when torch is a CUDA build and a
CUDA toolkit is found (see ``setup.py``); otherwise bitdistill installs without it and this module
still imports. Nothing here loads the extension until it is used.

    from bitdistill import cuda_ext
    if cuda_ext.is_available():
        y = cuda_ext.packed_linear_cuda(x2d, packed, weight_scale, bias)   # [M, N]
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

__all__ = ["BUILD_HINT", "activation_quant_cuda", "is_available", "load", "packed_linear_cuda"]

BUILD_HINT = (
    "the CUDA extension bitdistill._C is not built. Build it from a source checkout on a machine with a CUDA "
    "build of torch and the CUDA toolkit (nvcc; set CUDA_HOME if it is not found): "
    "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`); "
    "or use BITDISTILL_BACKEND=triton / reference"
)


@functools.cache
def _import() -> ModuleType | None:
    try:
        from bitdistill import _C
    except ImportError:
        return None
    return _C


def is_available() -> bool:
    """True when ``bitdistill._C`` is built and importable and a CUDA device is visible."""
    return _import() is not None and torch.cuda.is_available()


def load() -> ModuleType:
    """The extension module; raises ``RuntimeError`` naming how to build it when it is missing."""
    module = _import()
    if module is None:
        raise RuntimeError(BUILD_HINT)
    return module


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _checked_module(x2d, packed, weight_scale, bias, out) -> ModuleType:
    """The extension, once every argument problem has been raised as a ValueError (shapes and dtypes
    first, so they are reported even without the extension; devices after loading it)."""
    if x2d.dim() != 2:
        raise ValueError(f"packed_linear_cuda expects 2-D activations [M, K], got shape {tuple(x2d.shape)}; "
                         "reshape to (-1, in_features) first")
    m, k = x2d.shape
    if k % 4 != 0 or k == 0:
        raise ValueError(f"packed_linear_cuda needs in_features % 4 == 0, got K={k}; "
                         "use BITDISTILL_BACKEND=reference for this layer")
    if x2d.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"packed_linear_cuda: x must be float32, bfloat16 or float16, got {x2d.dtype}")
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != k:
        raise ValueError(f"packed_linear_cuda: packed must be uint8 [out_features / 4, {k}], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    if weight_scale.numel() != 1:
        raise ValueError(f"packed_linear_cuda: weight_scale must hold one value, got shape {tuple(weight_scale.shape)}")
    n = packed.shape[0] * 4
    tensors = {"x": x2d, "packed": packed, "weight_scale": weight_scale}
    if bias is not None:
        if bias.numel() != n:
            raise ValueError(f"packed_linear_cuda: bias has {bias.numel()} elements, expected out_features={n}")
        tensors["bias"] = bias
    if out is not None:
        if out.shape != (m, n) or out.dtype != x2d.dtype or not out.is_contiguous():
            raise ValueError(f"packed_linear_cuda: out must be a contiguous [{m}, {n}] {x2d.dtype} tensor, got "
                             f"{out.dtype} {tuple(out.shape)}")
        tensors["out"] = out
    module = load()
    if x2d.device.type == "cuda" and _capability(x2d.device.index) < (8, 0):
        raise ValueError(f"packed_linear_cuda needs a GPU of compute capability >= 8.0, {x2d.device} has "
                         f"{_capability(x2d.device.index)}; use BITDISTILL_BACKEND=triton or reference")
    bad = [name for name, t in tensors.items() if t.device != x2d.device or t.device.type != "cuda"]
    if bad:
        raise ValueError(f"packed_linear_cuda: {', '.join(bad)} must be on the same CUDA device as x "
                         f"(x is on {x2d.device})")
    return module


def packed_linear_cuda(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: int = -1,
    splits: int = -1,
    pdl: bool = True,
    fuse: bool = False,
) -> torch.Tensor:
    """W2A8 packed linear on CUDA: ``(X_q @ T^T) / (s_x * weight_scale) + bias``.

    Same function as :func:`bitdistill.quant.packed_linear_reference` for 2-D input, bit for bit
    (per-token int8 activation quantization with round-half-to-even inside the kernel, exact int32
    accumulation, float32 epilogue with IEEE division, rounded once to ``x``'s dtype).

    Args:
        x2d: ``[M, K]`` float32/bfloat16/float16 on a CUDA device; ``K % 4 == 0``. Fastest for
            ``M <= 16`` (decode); any ``M`` is computed in tiles of 16 tokens.
        packed: ``uint8 [N // 4, K]`` in the Hugging Face bitnet layout (``bitdistill.quant.pack_ternary``).
        weight_scale: one value, the inverse weight scale ``1 / gamma`` (any float dtype).
        bias: ``[N]`` or ``None``; float32 or ``x2d``'s dtype (others are cast to float32).
        out: optional contiguous ``[M, N]`` tensor of ``x2d``'s dtype to write into (e.g. a static
            buffer for CUDA graphs); a new tensor when ``None``.
        config: launch configuration index (warps, loads in flight) for benchmarking; -1 picks.
        splits: number of K splits for benchmarking; -1 picks from the shape and the GPU.
        pdl: overlap the GEMV's weight loads with the quantization kernel (programmatic dependent
            launch; ignored below compute capability 9.0).
        fuse: allow the single-kernel path for ``M <= 8`` bfloat16/float16 tokens (quantization in
            registers, no scratch). Measured slower than the default quantization kernel + GEMV pair
            on all but the smallest shapes (docs/cuda.md).

    Returns:
        ``[M, N]`` in ``x2d``'s dtype.

    Raises:
        ValueError: unsupported arguments (the message names the problem).
        RuntimeError: the extension is not built (the message names the build command).
    """
    module = _checked_module(x2d, packed, weight_scale, bias, out)
    return module.packed_linear(x2d, packed, weight_scale, bias, out, config, splits, pdl, fuse)


def activation_quant_cuda(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 activation quantization on CUDA, bit-identical to :func:`bitdistill.activation_quant`.

    Args:
        x2d: ``[M, K]`` float32/bfloat16/float16 on a CUDA device; ``K % 4 == 0``.

    Returns:
        ``(codes, scale)``: int8 ``[M, K]`` (a view of a row-padded buffer) and float32 ``[M, 1]``.
    """
    if x2d.dim() != 2 or x2d.shape[-1] % 4 != 0 or x2d.shape[-1] == 0 or x2d.shape[0] == 0:
        raise ValueError(f"activation_quant_cuda expects [M, K] with M >= 1, K % 4 == 0, got shape {tuple(x2d.shape)}")
    if x2d.dtype not in _FLOAT_DTYPES or x2d.device.type != "cuda":
        raise ValueError(f"activation_quant_cuda: x must be a float32/bfloat16/float16 CUDA tensor, got "
                         f"{x2d.dtype} on {x2d.device}")
    return load().activation_quant(x2d)
