"""Packed-weight inference: BitLinear straight from the Hugging Face ``uint8 [N/4, K]`` layout.

``packed[r, k]`` holds the codes ``c = T + 1`` of rows ``r, P + r, 2P + r, 3P + r`` (``P = N / 4``) in bits
0-1, 2-3, 4-5, 6-7. The weight is unpacked in registers and never written out.

* Decode (``M <= 16`` tokens): each program computes ``4 * BLOCK_P`` outputs, one per code block of
  ``BLOCK_P`` packed rows, with an int8 dot, streaming the packed bytes once. Up to 4 tokens it is one
  launch: each program quantizes the activation rows itself (absmax pass, then quantize while streaming the
  weight); for 5-16 tokens the activation-quant kernel runs first. Memory-bound on the packed bytes.
* Prefill (``M > 16``): the activation-quant kernel, then the int8 tensor-core GEMM of
  :mod:`bitdistill.kernels.linear` in packed mode.

Result: ``(X_q @ T^T) / (s_x * weight_scale) + bias`` in ``x``'s dtype, as
:func:`bitdistill.quant.packing.packed_linear_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitdistill.kernels._common import (
    check_device,
    check_float,
    check_out,
    configs,
    contiguous,
    round_half_even,
)
from bitdistill.kernels.linear import packed_matmul
from bitdistill.kernels.quant import activation_quant

__all__ = ["DECODE_MAX_M", "FUSED_QUANT_MAX_M", "packed_linear"]

#: Largest token count served by the decode kernel (the int8 GEMM takes over above).
DECODE_MAX_M = 16
#: Up to this many tokens the decode kernel also quantizes the activations itself (one launch); above it
#: every program would re-read too many activation rows, so the activation-quant kernel runs first.
FUSED_QUANT_MAX_M = 4

_GEMV_CONFIGS = configs(
    [triton.Config({"BLOCK_P": bp, "BLOCK_K": bk}, num_warps=w, num_stages=s)
     for bp, bk, w, s in [(4, 256, 4, 4), (4, 512, 4, 3), (8, 256, 4, 4), (8, 512, 4, 3), (16, 256, 4, 3),
                          (4, 1024, 8, 3), (8, 1024, 8, 3), (16, 512, 8, 3)]],
    triton.Config({"BLOCK_P": 4, "BLOCK_K": 32}, num_warps=4, num_stages=1),
)


@triton.autotune(configs=_GEMV_CONFIGS, key=["M_PAD", "P", "K", "QUANT"])
@triton.jit
def _packed_gemv_kernel(x_ptr, xs_ptr, p_ptr, ws_ptr, bias_ptr, y_ptr, M, P, K, stride_xm,
                        QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.arange(0, M_PAD)
    m_mask = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + (tl.where(m_mask, offs_m, 0).to(tl.int64) * stride_xm)[:, None]
    if QUANT:
        # per-token absmax of the (few) float rows, read again below from L1/L2
        amax = tl.zeros([M_PAD, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ok = k0 + offs_k
            x = tl.load(x_rows + ok[None, :], mask=m_mask[:, None] & (ok < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        one = tl.full([M_PAD], 1.0, tl.float32)
        scale = tl.math.div_rn(one, tl.maximum(tl.max(amax, axis=1), 1e-5)) * 127.0
    else:
        scale = tl.load(xs_ptr + offs_m, mask=m_mask, other=1.0)
    # column j of the tile is code block j // BLOCK_P of packed row pid * BLOCK_P + j % BLOCK_P; each packed
    # byte is loaded by four columns (served from L1) and unpacked in registers
    pid = tl.program_id(0)
    j = tl.arange(0, 4 * BLOCK_P)
    row = pid * BLOCK_P + j % BLOCK_P
    row_mask = row < P
    p_ptrs = p_ptr + (tl.where(row_mask, row, 0).to(tl.int64) * K)[None, :] + offs_k[:, None]
    shift = ((j // BLOCK_P) * 2).to(tl.uint8)[None, :]
    acc = tl.zeros([M_PAD, 4 * BLOCK_P], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + offs_k
        k_mask = ok < K
        x = tl.load(x_rows + ok[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
        if QUANT:
            q = round_half_even(tl.minimum(tl.maximum(x.to(tl.float32) * scale[:, None], -128.0), 127.0))
            q = q.to(tl.int8)
        else:
            q = x
        byte = tl.load(p_ptrs, mask=k_mask[:, None], other=85)
        w = ((byte >> shift) & 3).to(tl.int8) - 1
        acc = tl.dot(q, w, acc, out_dtype=tl.int32)
        p_ptrs += BLOCK_K
    y = acc.to(tl.float32) / (scale * tl.load(ws_ptr))[:, None]
    n = (j // BLOCK_P) * P + row
    if HAS_BIAS:
        y += tl.load(bias_ptr + n, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + (offs_m.to(tl.int64) * (4 * P))[:, None] + n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & row_mask[None, :])


def packed_linear(x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """BitLinear forward from packed weights.

    Args:
        x: ``[..., K]`` float32/bfloat16/float16 activations.
        packed: ``uint8 [N / 4, K]`` (Hugging Face ``bitnet`` layout).
        weight_scale: one element, ``1 / gamma`` as stored on disk (any float dtype).
        bias: ``[N]`` or None.
        out: optional ``[..., N]`` buffer of ``x``'s dtype.

    Returns:
        ``[..., N]`` in ``x``'s dtype.
    """
    where = "bitdistill.kernels.packed_linear"
    tensors = [x, packed, weight_scale] + ([bias] if bias is not None else [])
    check_device(*tensors, where=where)
    check_float(x, "x", where)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"{where}: packed must be uint8 [N/4, K], got {packed.dtype} {tuple(packed.shape)}")
    if x.dim() == 0 or x.shape[-1] != packed.shape[1]:
        raise ValueError(f"{where}: x must be [..., K] with K={packed.shape[1]} (packed.shape[1]), "
                         f"got {tuple(x.shape)}")
    if weight_scale.numel() != 1 or not weight_scale.is_floating_point():
        raise ValueError(f"{where}: weight_scale must be a one-element float tensor (1/gamma), "
                         f"got {weight_scale.dtype} {tuple(weight_scale.shape)}")
    p, k = packed.shape
    n = 4 * p
    if bias is not None:
        check_float(bias, "bias", where)
        if bias.shape != (n,):
            raise ValueError(f"{where}: bias must have shape ({n},), got {tuple(bias.shape)}")
        bias = contiguous(bias)
    out_shape = (*x.shape[:-1], n)
    y = (torch.empty(out_shape, dtype=x.dtype, device=x.device) if out is None
         else check_out(out, out_shape, x.dtype, x.device, "out", where))
    x2 = contiguous(x).reshape(-1, k)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.copy_(bias.expand(out_shape)) if bias is not None else y.zero_()
    ws = weight_scale.detach().float().reshape(())
    packed = contiguous(packed)
    y2 = y.view(m, n)
    bias_arg = bias if bias is not None else ws
    grid = lambda meta: (triton.cdiv(p, meta["BLOCK_P"]),)  # noqa: E731
    if m <= FUSED_QUANT_MAX_M:
        _packed_gemv_kernel[grid](x2, ws, packed, ws, bias_arg, y2, m, p, k, x2.stride(0), QUANT=True,
                                  HAS_BIAS=bias is not None, M_PAD=16)
        return y
    x_codes, x_scale = activation_quant(x2)
    if m <= DECODE_MAX_M:
        _packed_gemv_kernel[grid](x_codes, x_scale, packed, ws, bias_arg, y2, m, p, k, k, QUANT=False,
                                  HAS_BIAS=bias is not None, M_PAD=16)
        return y
    packed_matmul(x_codes, x_scale, packed, ws, bias, y2)
    return y
