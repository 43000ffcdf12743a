"""BitNet b1.58 quantization in pure torch: the CPU path, the kernels' test oracle, the benchmark baseline.

The math (Ma et al., "The Era of 1-bit LLMs", 2024; as Hugging Face transformers and onebitllms implement it):

Weights, one scale per tensor (absmean)::

    gamma = max(mean(|W|), 1e-5)
    T     = clamp(round(W / gamma), -1, 1)          # int8 codes in {-1, 0, +1}
    W_q   = T * gamma                                # dequantized ("fake-quant") weight

or, with ``per_row=True`` (``BitNetConfig(weight_scale="row")``), one scale per output row ``r``::

    gamma_r = max(mean(|W_r|), 1e-5)                 # gamma float32 [out_features]
    T_r     = clamp(round(W_r / gamma_r), -1, 1)

Activations, one scale per token (absmax over the last dimension)::

    s_x = 127 / max(max(|x|), 1e-5)
    X_q = clamp(round(x * s_x), -128, 127)           # int8 codes
    x_q = X_q / s_x                                  # dequantized activation

Linear layer::

    y = (X_q @ T^T) * gamma / s_x + bias               # gamma broadcast over output columns when per row

computed in float32 as ``acc / (s_x * (1 / gamma))``: the same operations, in the same order, as the
packed format (whose ``weight_scale`` is ``1 / gamma``) and transformers' BitLinear, so that a packed
export computes bit for bit what the student computed on CPU.

All scale math is done in float32 whatever the input dtype; ``round`` is round-half-to-even
(``torch.round``). The integer product ``X_q @ T^T`` is exact: every partial sum is an integer of
magnitude at most ``128 * K``, so a float32 matmul of the integer-valued codes is exact for
``K < 2**17`` (checked), which is how the CPU path computes it (MKL/oneDNN float32 GEMM is far
faster on CPU than an int32 GEMM).
"""

from __future__ import annotations

import torch

__all__ = [
    "ACT_QMAX",
    "ACT_QMIN",
    "EPS",
    "MAX_EXACT_K",
    "activation_quant",
    "bitlinear_reference",
    "fake_quant_activation",
    "fake_quant_weight",
    "int_matmul",
    "weight_quant",
]

EPS = 1e-5
ACT_QMAX = 127
ACT_QMIN = -128
# float32 represents every integer below 2**24 exactly; |partial sum| <= 128 * K.
MAX_EXACT_K = 2**24 // 128


def weight_quant(weight: torch.Tensor, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternarize a weight tensor with one absmean scale (per tensor, or per output row).

    Args:
        weight: any shape, any float dtype (typically ``[out_features, in_features]``); 2-D when ``per_row``.
        per_row: one scale per row ``r`` of ``weight``: ``gamma_r = max(mean(|W_r|), 1e-5)``.

    Returns:
        ``(codes, gamma)``: ``codes`` int8 of ``weight``'s shape with values in {-1, 0, 1};
        ``gamma`` float32, ``max(mean(|W|), 1e-5)``: 0-dim, or ``[out_features]`` when ``per_row``.
    """
    w = weight.detach().float()
    if per_row:
        if w.dim() != 2:
            raise ValueError(f"per-row weight_quant expects a 2-D [out, in] weight, got shape {tuple(w.shape)}")
        gamma = w.abs().mean(dim=1).clamp_(min=EPS)
        codes = (w / gamma[:, None]).round_().clamp_(-1, 1).to(torch.int8)
        return codes, gamma
    gamma = w.abs().mean().clamp_(min=EPS)
    codes = (w / gamma).round_().clamp_(-1, 1).to(torch.int8)  # in place on the quotient only
    return codes, gamma


def activation_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to int8 with one absmax scale per token (last dimension).

    Args:
        x: ``[..., K]``, any float dtype.

    Returns:
        ``(codes, scale)``: ``codes`` int8 ``[..., K]``; ``scale`` float32 ``[..., 1]``, the
        multiplier ``s_x = 127 / max(max|x|, 1e-5)`` (so ``x ~= codes / scale``).
    """
    xf = x.detach().float()
    absmax = torch.linalg.vector_norm(xf, ord=float("inf"), dim=-1, keepdim=True)  # max|x|, no |x| temporary
    scale = ACT_QMAX / absmax.clamp_(min=EPS)
    codes = (xf * scale).round_().clamp_(ACT_QMIN, ACT_QMAX).to(torch.int8)
    return codes, scale


def fake_quant_weight(weight: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """``T * gamma`` in ``weight``'s dtype (the dequantized ternary weight), same shape."""
    codes, gamma = weight_quant(weight, per_row)
    return (codes.float() * (gamma[:, None] if per_row else gamma)).to(weight.dtype)


def fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """``X_q / s_x`` in ``x``'s dtype (the dequantized int8 activation), same shape."""
    codes, scale = activation_quant(x)
    return (codes.float() / scale).to(x.dtype)


def int_matmul(x_codes: torch.Tensor, w_codes: torch.Tensor) -> torch.Tensor:
    """Exact integer product ``X_q @ T^T`` returned as float32.

    Args:
        x_codes: int8 ``[M, K]``.
        w_codes: int8 ``[N, K]``.

    Returns:
        float32 ``[M, N]`` holding exact integers.
    """
    k = x_codes.shape[-1]
    if k >= MAX_EXACT_K:
        # Beyond float32's exact-integer range: accumulate in float64 (exact up to 2**53).
        return (x_codes.double() @ w_codes.double().t()).float()
    return x_codes.float() @ w_codes.float().t()


def bitlinear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, per_row: bool = False
) -> torch.Tensor:
    """Forward of a BitNet b1.58 linear layer: ``(X_q @ T^T) * gamma / s_x + bias``.

    Args:
        x: ``[..., K]`` activations (float32/bfloat16/float16).
        weight: ``[N, K]`` latent full-precision weight.
        bias: ``[N]`` or ``None``.
        per_row: one weight scale per output row (``gamma [N]``) instead of one per tensor.

    Returns:
        ``[..., N]`` in ``x``'s dtype.
    """
    x_codes, x_scale = activation_quant(x)
    w_codes, gamma = weight_quant(weight, per_row)
    acc = int_matmul(x_codes.reshape(-1, x.shape[-1]), w_codes)
    y = acc / (x_scale.reshape(-1, 1) * (1.0 / gamma))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
