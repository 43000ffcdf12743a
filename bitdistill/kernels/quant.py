"""Quantizers: per-token int8 activation quant (one pass) and per-tensor absmean ternarization on device.

Both give exactly the codes of :mod:`bitdistill.quant.reference` (same float32 ops, IEEE division,
round half to even). The weight scale is reduced on the device in a fixed order (partial sums, then one
program), so it is deterministic, needs no host sync and is safe inside CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitdistill.kernels._common import check_device, check_float, check_out, contiguous, round_half_even

__all__ = ["activation_quant", "dequant_activation", "dequant_ternary", "ternarize", "weight_quant"]

EPS = 1e-5
#: Rows up to this width are quantized from registers in a single read; wider rows are read twice
#: (the second read is served from L2).
MAX_SINGLE_PASS_K = 16384


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK_K: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    # s_x = reciprocal(max(amax, eps)) * 127, two roundings exactly as torch evaluates ``127 / tensor``.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * K
    offs = tl.arange(0, BLOCK_K)
    if NUM_CHUNKS == 1:
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.maximum(amax, 1e-5)) * 127.0
        q = round_half_even(tl.minimum(tl.maximum(x * scale, -128.0), 127.0))
        tl.store(q_row + offs, q.to(tl.int8), mask=mask)
    else:
        amax = tl.zeros([BLOCK_K], tl.float32)
        for c in range(NUM_CHUNKS):
            o = c * BLOCK_K + offs
            x = tl.load(x_row + o, mask=o < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.maximum(tl.max(amax, axis=0), 1e-5)) * 127.0
        for c in range(NUM_CHUNKS):
            o = c * BLOCK_K + offs
            x = tl.load(x_row + o, mask=o < K, other=0.0).to(tl.float32)
            q = round_half_even(tl.minimum(tl.maximum(x * scale, -128.0), 127.0))
            tl.store(q_row + o, q.to(tl.int8), mask=o < K)
    tl.store(s_ptr + row, scale)


def activation_quant(x: torch.Tensor, *, out: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantization in one pass over ``x``.

    Args:
        x: ``[..., K]`` float32/bfloat16/float16 (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        out: optional ``(codes int8 [..., K], scale float32 [..., 1])`` buffers to write into.

    Returns:
        ``(codes, scale)`` exactly as :func:`bitdistill.quant.reference.activation_quant`.
    """
    where = "bitdistill.kernels.activation_quant"
    check_device(x, where=where)
    check_float(x, "x", where)
    if x.dim() == 0:
        raise ValueError(f"{where}: x must have a last (feature) dimension, got a 0-dim tensor")
    k = x.shape[-1]
    x2 = contiguous(x).reshape(-1, k)
    m = x2.shape[0]
    if out is None:
        codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    else:
        codes = check_out(out[0], x.shape, torch.int8, x.device, "codes", where)
        scale = check_out(out[1], (*x.shape[:-1], 1), torch.float32, x.device, "scale", where)
    if m == 0:
        return codes, scale
    if k == 0:
        scale.fill_(127.0 / EPS)
        return codes, scale
    block = min(triton.next_power_of_2(k), MAX_SINGLE_PASS_K)
    chunks = triton.cdiv(k, block)
    num_warps = 1 if block <= 256 else 4 if block <= 2048 else 8 if block <= 8192 else 16
    _act_quant_kernel[(m,)](x2, codes, scale, k, x2.stride(0), BLOCK_K=block, NUM_CHUNKS=chunks,
                            num_warps=num_warps)
    return codes, scale


@triton.jit
def _abs_sum_kernel(w_ptr, part_ptr, numel, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for c in range(CHUNKS):
        o = (pid * CHUNKS + c) * BLOCK + offs
        acc += tl.abs(tl.load(w_ptr + o, mask=o < numel, other=0.0).to(tl.float32))
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _gamma_kernel(part_ptr, gamma_ptr, n_parts, numel, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    total = tl.sum(tl.load(part_ptr + offs, mask=offs < n_parts, other=0.0), axis=0)
    mean = tl.math.div_rn(total, tl.full([], numel, tl.float32))
    tl.store(gamma_ptr, tl.maximum(mean, 1e-5))


@triton.jit
def _ternary_block(w_ptr, gamma_ptr, numel, BLOCK: tl.constexpr):
    """This program's block of ``clamp(round(W / gamma), -1, 1)``: (offsets, mask, codes as fp32, gamma)."""
    pid = tl.program_id(0).to(tl.int64)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    mask = o < numel
    gamma = tl.load(gamma_ptr)
    w = tl.load(w_ptr + o, mask=mask, other=0.0).to(tl.float32)
    t = round_half_even(tl.minimum(tl.maximum(tl.math.div_rn(w, gamma), -1.0), 1.0))
    return o, mask, t, gamma


@triton.jit
def _ternarize_kernel(w_ptr, gamma_ptr, t_ptr, numel, BLOCK: tl.constexpr):
    o, mask, t, _ = _ternary_block(w_ptr, gamma_ptr, numel, BLOCK)
    tl.store(t_ptr + o, t.to(tl.int8), mask=mask)


@triton.jit
def _dequant_ternary_kernel(w_ptr, gamma_ptr, o_ptr, numel, BLOCK: tl.constexpr):
    o, mask, t, gamma = _ternary_block(w_ptr, gamma_ptr, numel, BLOCK)
    tl.store(o_ptr + o, (t * gamma).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_activation_kernel(q_ptr, s_ptr, o_ptr, K, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    s = tl.load(s_ptr + row)
    q = tl.load(q_ptr + row * K + offs, mask=mask, other=0).to(tl.float32)
    tl.store(o_ptr + row * K + offs, tl.math.div_rn(q, s + tl.zeros_like(q)).to(o_ptr.dtype.element_ty), mask=mask)


def dequant_ternary(weight: torch.Tensor, gamma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W_q = clamp(round(W / gamma), -1, 1) * gamma`` in ``dtype``, one pass (the STE backward's weight)."""
    where = "bitdistill.kernels.dequant_ternary"
    check_device(weight, gamma, where=where)
    check_float(weight, "weight", where)
    w = contiguous(weight)
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    if w.numel():
        _dequant_ternary_kernel[(triton.cdiv(w.numel(), _TERN_BLOCK),)](
            w, contiguous(gamma).reshape(()), out, w.numel(), BLOCK=_TERN_BLOCK, num_warps=8)
    return out


def dequant_activation(x_codes: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x_q = X_q / s_x`` in ``dtype`` from int8 codes ``[M, K]`` and scales ``[M, 1]``, one pass."""
    where = "bitdistill.kernels.dequant_activation"
    check_device(x_codes, x_scale, where=where)
    q = contiguous(x_codes)
    m, k = q.shape
    out = torch.empty((m, k), dtype=dtype, device=q.device)
    if m and k:
        block = min(triton.next_power_of_2(k), 4096)
        _dequant_activation_kernel[(m, triton.cdiv(k, block))](q, contiguous(x_scale), out, k, BLOCK_K=block,
                                                               num_warps=4)
    return out


_SUM_BLOCK = 4096
_MAX_PARTS = 4096
_TERN_BLOCK = 4096


def ternarize(weight: torch.Tensor, gamma: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``clamp(round(W / gamma), -1, 1)`` as int8 with a given device scale ``gamma`` (0-dim float32)."""
    where = "bitdistill.kernels.ternarize"
    check_device(weight, gamma, where=where)
    check_float(weight, "weight", where)
    if gamma.numel() != 1 or gamma.dtype != torch.float32:
        raise ValueError(f"{where}: gamma must be a one-element float32 tensor, got {gamma.dtype} {tuple(gamma.shape)}")
    w = contiguous(weight)
    codes = (torch.empty(w.shape, dtype=torch.int8, device=w.device) if out is None
             else check_out(out, w.shape, torch.int8, w.device, "codes", where))
    numel = w.numel()
    if numel:
        _ternarize_kernel[(triton.cdiv(numel, _TERN_BLOCK),)](w, contiguous(gamma), codes, numel,
                                                               BLOCK=_TERN_BLOCK, num_warps=8)
    return codes


def weight_quant(weight: torch.Tensor, *, out: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternarization on the device: three launches, no host sync.

    Args:
        weight: any shape, float32/bfloat16/float16 (typically ``[N, K]``).
        out: optional ``(codes int8 like weight, gamma float32 0-dim)`` buffers.

    Returns:
        ``(codes, gamma)``; ``gamma = max(mean|W|, 1e-5)`` (summed in a fixed order, so deterministic; it
        can differ from ``torch.mean`` in the last bits) and ``codes`` exactly ``clamp(round(W / gamma), -1, 1)``.
    """
    where = "bitdistill.kernels.weight_quant"
    check_device(weight, where=where)
    check_float(weight, "weight", where)
    w = contiguous(weight)
    if out is None:
        gamma = torch.empty((), dtype=torch.float32, device=w.device)
        codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    else:
        codes = check_out(out[0], w.shape, torch.int8, w.device, "codes", where)
        gamma = check_out(out[1], (), torch.float32, w.device, "gamma", where)
    numel = w.numel()
    if numel == 0:
        gamma.fill_(EPS)
        return codes, gamma
    chunks = triton.cdiv(triton.cdiv(numel, _SUM_BLOCK), _MAX_PARTS)
    n_parts = triton.cdiv(numel, _SUM_BLOCK * chunks)
    parts = torch.empty(n_parts, dtype=torch.float32, device=w.device)
    _abs_sum_kernel[(n_parts,)](w, parts, numel, BLOCK=_SUM_BLOCK, CHUNKS=chunks, num_warps=8)
    _gamma_kernel[(1,)](parts, gamma, n_parts, numel, BLOCK=triton.next_power_of_2(n_parts), num_warps=8)
    return ternarize(w, gamma, out=codes), gamma
