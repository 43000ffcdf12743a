"""Training GEMMs of BitLinear: int8 x int8 forward with a fused epilogue, and the two STE backward GEMMs.

* forward: ``y = (X_q @ T^T) * (gamma / s_x) + bias`` — int8 tensor-core dot, int32 accumulation, the
  dequant/bias/cast epilogue fused. The same kernel serves the packed prefill GEMM (``PACKED``): the
  ternary codes are then unpacked in registers from the Hugging Face ``uint8 [N/4, K]`` layout and the
  epilogue is ``acc / (s_x * weight_scale)``.
* ``grad_x = grad_y @ (T * gamma)``: reads the int8 codes, converts them to the gradient dtype in
  registers (exact), scales by ``gamma`` in the epilogue.
* ``grad_W = grad_y^T @ (X_q / s_x)``: reads the saved int8 activations and their per-token scales.

Gradients are computed with float32 accumulation and written in ``grad_y``'s dtype; float32 operands use
IEEE float32 products (no TF32), like ``torch.matmul`` by default.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from bitdistill.kernels._common import (
    check_device,
    check_float,
    check_out,
    configs,
    contiguous,
    interpreting,
)
from bitdistill.kernels.quant import dequant_activation, dequant_ternary, ternarize

__all__ = ["backward_gemm", "int8_grad_weight", "int8_ternary_linear", "packed_matmul", "ternary_grad_input"]

BACKWARD_GEMMS = ("cublas", "triton")


def backward_gemm() -> str:
    """How the two backward GEMMs run (``BITDISTILL_BACKWARD_GEMM``, read per call).

    * ``cublas`` (default): one Triton pass dequantizes the int8 operand (``T * gamma`` from the latent
      weight, or ``X_q / s_x`` from the saved codes) to the gradient dtype, then ``torch.matmul``. The
      result is the reference's math exactly, at cuBLAS speed.
    * ``triton``: a single Triton GEMM per gradient that reads the int8 operand and converts it in registers
      (no dequantized copy in memory).
    """
    name = os.environ.get("BITDISTILL_BACKWARD_GEMM", "cublas").strip().lower() or "cublas"
    if name not in BACKWARD_GEMMS:
        raise ValueError(f"BITDISTILL_BACKWARD_GEMM={name!r} is not one of {', '.join(BACKWARD_GEMMS)}")
    return name


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


_INT8_CONFIGS = configs(
    [_cfg(128, 256, 128, 8, 3), _cfg(128, 128, 128, 8, 4), _cfg(128, 128, 64, 4, 4), _cfg(64, 128, 128, 4, 4),
     _cfg(256, 128, 128, 8, 3), _cfg(64, 64, 128, 4, 4)],
    _cfg(16, 16, 32, 4, 1, group=2),
)
_FLOAT_CONFIGS = configs(
    [_cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(128, 128, 32, 4, 4), _cfg(64, 128, 64, 4, 4),
     _cfg(256, 128, 64, 8, 3), _cfg(64, 64, 64, 4, 4)],
    _cfg(16, 16, 16, 4, 1, group=2),
)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order (L2 reuse of the B tiles)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m, pid_n


@triton.autotune(configs=_INT8_CONFIGS, key=["M_BUCKET", "N", "K", "PACKED"])
@triton.jit
def _int8_linear_kernel(
    a_ptr, b_ptr, s_ptr, w_scale_ptr, bias_ptr, c_ptr, M, N, K, P, M_BUCKET,
    HAS_BIAS: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Row offsets (not the contiguous dim) are clamped and widened to int64; the contiguous dims keep plain
    # `pid * BLOCK + arange` offsets with masks, so Triton can vectorize the loads and stores.
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    rm = tl.where(m_mask, offs_m, 0).to(tl.int64)
    rn = tl.where(n_mask, offs_n, 0).to(tl.int64)
    a_ptrs = a_ptr + (rm * K)[:, None] + offs_k[None, :]
    if PACKED:
        # column n of the output is code block n // P of packed row n % P
        b_ptrs = b_ptr + ((rn % P) * K)[None, :] + offs_k[:, None]
        shift = ((rn // P) * 2).to(tl.uint8)[None, :]
    else:
        b_ptrs = b_ptr + (rn * K)[None, :] + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=k_mask[None, :], other=0)
        if PACKED:
            byte = tl.load(b_ptrs, mask=k_mask[:, None], other=85)
            b = ((byte >> shift) & 3).to(tl.int8) - 1
        else:
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    s = tl.load(s_ptr + rm)
    w_scale = tl.load(w_scale_ptr)
    if PACKED:
        y = acc.to(tl.float32) / (s * w_scale)[:, None]
    else:
        y = acc.to(tl.float32) * (w_scale / s)[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + (rm * N)[:, None] + offs_n[None, :]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _m_bucket(m: int) -> int:
    """Autotune key for the token count: powers of two, so each bucket tunes once."""
    return triton.next_power_of_2(max(m, 16))


def _launch_int8(x_codes, x_scale, b, w_scale, bias, out, n, p, packed):
    m, k = x_codes.shape
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _int8_linear_kernel[grid](x_codes, b, x_scale, w_scale, bias if bias is not None else x_scale, out,
                              m, n, k, p, _m_bucket(m), HAS_BIAS=bias is not None, PACKED=packed)


def _check_codes_scale(x_codes, x_scale, where):
    if x_codes.dtype != torch.int8 or x_codes.dim() != 2:
        raise ValueError(f"{where}: x_codes must be int8 [M, K], got {x_codes.dtype} {tuple(x_codes.shape)}")
    if x_scale.dtype != torch.float32 or x_scale.numel() != x_codes.shape[0]:
        raise ValueError(f"{where}: x_scale must be float32 [M, 1] with M={x_codes.shape[0]}, "
                         f"got {x_scale.dtype} {tuple(x_scale.shape)}")


def _check_bias(bias, n, where):
    if bias is not None:
        check_float(bias, "bias", where)
        if bias.shape != (n,):
            raise ValueError(f"{where}: bias must have shape ({n},), got {tuple(bias.shape)}")


def int8_ternary_linear(x_codes: torch.Tensor, x_scale: torch.Tensor, w_codes: torch.Tensor,
                        gamma: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype, *,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """``(X_q @ T^T) * gamma / s_x + bias`` on int8 tensor cores.

    Args:
        x_codes: int8 ``[M, K]``; x_scale: float32 ``[M, 1]``; w_codes: int8 ``[N, K]`` in {-1, 0, 1};
        gamma: float32 one-element; bias: ``[N]`` or None; out_dtype: float32/bfloat16/float16.
        out: optional ``[M, N]`` buffer of ``out_dtype``.

    Returns:
        ``[M, N]`` in ``out_dtype``.
    """
    where = "bitdistill.kernels.int8_ternary_linear"
    tensors = [x_codes, x_scale, w_codes, gamma] + ([bias] if bias is not None else [])
    check_device(*tensors, where=where)
    _check_codes_scale(x_codes, x_scale, where)
    if w_codes.dtype != torch.int8 or w_codes.dim() != 2 or w_codes.shape[1] != x_codes.shape[1]:
        raise ValueError(f"{where}: w_codes must be int8 [N, K] with K={x_codes.shape[1]}, "
                         f"got {w_codes.dtype} {tuple(w_codes.shape)}")
    n = w_codes.shape[0]
    _check_bias(bias, n, where)
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{where}: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    m = x_codes.shape[0]
    y = (torch.empty((m, n), dtype=out_dtype, device=x_codes.device) if out is None
         else check_out(out, (m, n), out_dtype, x_codes.device, "out", where))
    if m == 0 or n == 0:
        return y
    if x_codes.shape[1] == 0:
        return y.copy_(bias.expand(m, n)) if bias is not None else y.zero_()
    _launch_int8(contiguous(x_codes), contiguous(x_scale), contiguous(w_codes), contiguous(gamma).reshape(()),
                 contiguous(bias) if bias is not None else None, y, n, n, packed=False)
    return y


def packed_matmul(x_codes: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor,
                  weight_scale: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Prefill GEMM from the packed layout: ``out [M, N] = (X_q @ unpack(packed)^T) / (s_x * weight_scale) + bias``.

    Inputs are validated by :func:`bitdistill.kernels.packed.packed_linear`; ``out`` is written in full.
    """
    _launch_int8(x_codes, x_scale, packed, weight_scale, bias, out, packed.shape[0] * 4, packed.shape[0],
                 packed=True)
    return out


@triton.jit
def _float_dot(a, b, acc, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + a @ b`` with float32 accumulation; ``b`` is converted to ``a``'s dtype (exactly, for codes).

    The Triton interpreter mis-handles bfloat16 dots and int8 -> bfloat16 casts, so under it both operands
    go through float32 (same products, exact for these operands).
    """
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b.to(a.dtype), acc, input_precision="ieee")
    else:
        return tl.dot(a, b.to(a.dtype), acc)


@triton.autotune(configs=_FLOAT_CONFIGS, key=["M_BUCKET", "N", "K"])
@triton.jit
def _grad_input_kernel(g_ptr, t_ptr, gamma_ptr, o_ptr, M, N, K, M_BUCKET, stride_gm,
                       IEEE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # out [M, K] = g [M, N] @ T [N, K]; here BLOCK_N is the output-column tile (over K) and BLOCK_K the
    # reduction tile (over N), so the autotune configs keep their usual meaning.
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    k_mask = offs_k < K
    rm = tl.where(m_mask, offs_m, 0).to(tl.int64)
    g_ptrs = g_ptr + (rm * stride_gm)[:, None] + offs_r[None, :]
    t_ptrs = t_ptr + (offs_r.to(tl.int64) * K)[:, None] + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r in range(0, tl.cdiv(N, BLOCK_K)):
        r_mask = offs_r < N - r * BLOCK_K
        g = tl.load(g_ptrs, mask=r_mask[None, :], other=0.0)
        t = tl.load(t_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0)
        acc = _float_dot(g, t, acc, IEEE, INTERPRET)
        g_ptrs += BLOCK_K
        t_ptrs += BLOCK_K * K
    y = acc * tl.load(gamma_ptr)
    o_ptrs = o_ptr + (rm * K)[:, None] + offs_k[None, :]
    tl.store(o_ptrs, y.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


def ternary_grad_input(grad_y: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, *,
                       w_codes: torch.Tensor | None = None, out: torch.Tensor | None = None,
                       gemm: str | None = None) -> torch.Tensor:
    """STE input gradient ``grad_y [M, N] @ (T * gamma) [N, K] -> [M, K]`` in ``grad_y``'s dtype.

    ``T`` is re-ternarized from the latent ``weight [N, K]`` with the forward's ``gamma`` (one cheap pass,
    identical codes) unless the int8 codes are passed as ``w_codes``. ``gemm``: ``"cublas"`` or
    ``"triton"`` (default: :func:`backward_gemm`).
    """
    where = "bitdistill.kernels.ternary_grad_input"
    check_device(grad_y, weight, gamma, where=where)
    check_float(grad_y, "grad_y", where)
    if grad_y.dim() != 2 or weight.dim() != 2 or grad_y.shape[1] != weight.shape[0]:
        raise ValueError(f"{where}: expected grad_y [M, N] and weight [N, K], got {tuple(grad_y.shape)} and "
                         f"{tuple(weight.shape)}")
    m, n = grad_y.shape
    k = weight.shape[1]
    o = (torch.empty((m, k), dtype=grad_y.dtype, device=grad_y.device) if out is None
         else check_out(out, (m, k), grad_y.dtype, grad_y.device, "out", where))
    if m == 0 or k == 0:
        return o
    if n == 0:
        return o.zero_()
    g = contiguous(grad_y)
    if (gemm or backward_gemm()) == "cublas" and w_codes is None:
        return torch.matmul(g, dequant_ternary(weight, gamma, g.dtype), out=o)
    codes = ternarize(weight, gamma) if w_codes is None else contiguous(w_codes)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)  # noqa: E731
    _grad_input_kernel[grid](g, codes, contiguous(gamma).reshape(()), o, m, n, k, _m_bucket(m), g.stride(0),
                             IEEE=g.dtype == torch.float32,
                             INTERPRET=interpreting())
    return o


@triton.autotune(configs=_FLOAT_CONFIGS, key=["N_BUCKET", "M", "K"])
@triton.jit
def _grad_weight_kernel(g_ptr, q_ptr, s_ptr, o_ptr, M, N, K, N_BUCKET,
                        IEEE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # out [N, K] = g^T [N, M] @ (X_q / s_x) [M, K]; tiles: BLOCK_M over N (rows of out), BLOCK_N over K,
    # BLOCK_K over the token reduction M.
    pid_n, pid_k = _tile_ids(N, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    g_ptrs = g_ptr + (offs_r.to(tl.int64) * N)[None, :] + offs_n[:, None]
    q_ptrs = q_ptr + (offs_r.to(tl.int64) * K)[:, None] + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r in range(0, tl.cdiv(M, BLOCK_K)):
        r_mask = offs_r < M - r * BLOCK_K
        g = tl.load(g_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        inv_s = 1.0 / tl.load(s_ptr + r * BLOCK_K + offs_r, mask=r_mask, other=1.0)
        q = tl.load(q_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0).to(tl.float32)
        x = (q * inv_s[:, None]).to(g.dtype)
        acc = _float_dot(g, x, acc, IEEE, INTERPRET)
        g_ptrs += BLOCK_K * N
        q_ptrs += BLOCK_K * K
    o_ptrs = o_ptr + (offs_n.to(tl.int64) * K)[:, None] + offs_k[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


def int8_grad_weight(grad_y: torch.Tensor, x_codes: torch.Tensor, x_scale: torch.Tensor, *,
                     out: torch.Tensor | None = None, gemm: str | None = None) -> torch.Tensor:
    """STE weight gradient ``grad_y^T [N, M] @ (X_q / s_x) [M, K] -> [N, K]`` in ``grad_y``'s dtype.

    ``gemm``: ``"cublas"`` or ``"triton"`` (default: :func:`backward_gemm`).
    """
    where = "bitdistill.kernels.int8_grad_weight"
    check_device(grad_y, x_codes, x_scale, where=where)
    check_float(grad_y, "grad_y", where)
    _check_codes_scale(x_codes, x_scale, where)
    if grad_y.dim() != 2 or grad_y.shape[0] != x_codes.shape[0]:
        raise ValueError(f"{where}: grad_y must be [M, N] with M={x_codes.shape[0]}, got {tuple(grad_y.shape)}")
    m, n = grad_y.shape
    k = x_codes.shape[1]
    o = (torch.empty((n, k), dtype=grad_y.dtype, device=grad_y.device) if out is None
         else check_out(out, (n, k), grad_y.dtype, grad_y.device, "out", where))
    if n == 0 or k == 0:
        return o
    if m == 0:
        return o.zero_()
    g = contiguous(grad_y)
    if (gemm or backward_gemm()) == "cublas":
        return torch.matmul(g.t(), dequant_activation(x_codes, x_scale, g.dtype), out=o)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)  # noqa: E731
    _grad_weight_kernel[grid](g, contiguous(x_codes), contiguous(x_scale), o, m, n, k, _m_bucket(n),
                              IEEE=g.dtype == torch.float32,
                             INTERPRET=interpreting())
    return o
