"""Data-aware ternary rounding for one linear layer, and latent weights that encode a chosen ternary weight.

A BitLinear's ternary weight is ``T * alpha`` with codes ``T`` in {-1, 0, 1} and one scale ``alpha`` per
tensor. Round-to-nearest ``T = round(W / mean|W|)`` ignores which input directions matter. Given the
layer's input second moment ``H = X^T X`` (``X [tokens, in_features]``), the output error of any weight
``Q`` is ``tr((W - Q) H (W - Q)^T)``; :func:`gptq_ternary` rounds column by column and spreads each
column's rounding error over the columns not yet rounded, weighted by ``H^-1`` (GPTQ, Frantar et al.
2023), on the ternary grid ``{-alpha, 0, alpha}``. :func:`calibrated_ternary` searches ``alpha`` over a grid
around ``mean|W|`` and refits it in closed form for the chosen codes.

BitLinear recomputes ``gamma = mean|W|`` and ``T = clamp(round(W / gamma), -1, 1)`` from its latent weight
every forward, so the result has to be *encoded*: :func:`encode_ternary` returns latent weights whose
absmean is ``alpha`` (up to float32 rounding of the mean) and whose codes are exactly ``T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitdistill.quant.reference import weight_quant

__all__ = ["TernaryFit", "calibrated_ternary", "encode_ternary", "gptq_ternary", "hessian_inverse_factor", "output_error"]


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the summed squared output error of ``Q`` instead of ``W`` on the data of ``H``.

    Args:
        weight, quantized: ``[out, in]``.
        hessian: ``[in, in]``, ``X^T X`` of the layer's inputs.
    """
    d = (weight.double() - quantized.double())
    return float(((d @ hessian.double()) * d).sum())


def hessian_inverse_factor(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` (float32 ``[in, in]``) that
    GPTQ walks along, and the mask of input columns that never saw a nonzero input (``[in]`` bool)."""
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diag(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return hinv.float(), dead


def gptq_ternary(weight: torch.Tensor, hinv: torch.Tensor, alpha: torch.Tensor | float, *,
                 dead: torch.Tensor | None = None, block: int = 128) -> torch.Tensor:
    """Error-compensating rounding of ``weight`` to ``{-alpha, 0, alpha}`` (GPTQ with a fixed ternary grid).

    Args:
        weight: ``[out, in]`` full-precision weight (not modified).
        hinv: ``[in, in]`` from :func:`hessian_inverse_factor`.
        alpha: the grid's scale (> 0): a number, or ``[out]`` (one per row, e.g. stacked copies of a weight
            rounded at several scales in one pass).
        dead: ``[in]`` columns without input (set to 0 before rounding).
        block: columns processed per lazy-update block.

    Returns:
        int8 codes ``[out, in]`` in {-1, 0, 1}.
    """
    w = weight.detach().float().clone()
    if dead is not None:
        w[:, dead] = 0.0
    a = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1)
    a = a.expand(w.shape[0]) if a.numel() == 1 else a
    n_in = w.shape[1]
    codes = torch.zeros(w.shape, dtype=torch.int8)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            c = (col / a).round_().clamp_(-1, 1)
            codes[:, i1 + i] = c.to(torch.int8)
            e = (col - c * a) / hinv1[i, i]
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)
            err1[:, i] = e
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    return codes


@dataclass
class TernaryFit:
    """A chosen ternary weight ``codes * alpha`` and its output error against the full-precision weight.

    Attributes:
        codes: int8 ``[out, in]`` in {-1, 0, 1}.
        alpha: the scale.
        error: ``tr((W - Q) H (W - Q)^T)`` of the fit.
        absmean_error: the same for plain absmean rounding (the baseline).
    """

    codes: torch.Tensor
    alpha: float
    error: float
    absmean_error: float


def calibrated_ternary(weight: torch.Tensor, hessian: torch.Tensor, *,
                       scales: tuple[float, ...] = (0.7, 0.85, 1.0, 1.2, 1.4), damp: float = 0.01,
                       factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> TernaryFit:
    """The best ternary weight for the inputs of ``hessian``: GPTQ rounding at each grid scale
    ``s * mean|W|`` (all scales in one pass), the scale refit in closed form for each candidate's codes
    (``<W H, T> / <T H, T>``), the lowest output error kept.

    Args:
        weight: ``[out, in]`` (not modified).
        hessian: ``[in, in]`` ``X^T X`` of the layer's inputs.
        scales: multiples of ``mean|W|`` tried as the rounding grid.
        damp: GPTQ dampening.
        factor: :func:`hessian_inverse_factor` of ``hessian`` when already computed (layers sharing an input).

    Returns:
        A :class:`TernaryFit`; never worse than absmean rounding (which is always a candidate).
    """
    base_codes, gamma = weight_quant(weight)
    w = weight.detach().float()
    h = hessian.detach().float()
    hinv, dead = factor if factor is not None else hessian_inverse_factor(hessian, damp)
    n = w.shape[0]
    alphas = torch.tensor([s * float(gamma) for s in scales]).repeat_interleave(n)
    stacked = gptq_ternary(w.repeat(len(scales), 1), hinv, alphas, dead=dead)
    cands = torch.cat([base_codes, stacked]).reshape(len(scales) + 1, n, -1).float()  # [C, out, in]
    th = cands @ h  # [C, out, in]
    wh = w @ h
    tht = (th * cands).sum((1, 2)).double()
    wht = (th * w).sum((1, 2)).double()
    whw = float((wh * w).sum())
    alpha = torch.where(tht > 0, wht / tht.clamp_min(1e-30), torch.full_like(tht, float(gamma)))
    errors = whw - 2 * alpha * wht + alpha**2 * tht  # tr((W - aT) H (W - aT)^T), expanded
    a0 = float(gamma)
    absmean_error = float(whw - 2 * a0 * wht[0] + a0**2 * tht[0])
    nonzero = cands.abs().sum((1, 2)) > 0
    errors = torch.where(nonzero & (alpha > 0), errors, torch.full_like(errors, float("inf")))
    best = int(torch.argmin(errors))
    if not float(errors[best]) < absmean_error:
        return TernaryFit(base_codes, a0, absmean_error, absmean_error)
    return TernaryFit(cands[best].to(torch.int8), float(alpha[best]), float(errors[best]), absmean_error)


def encode_ternary(codes: torch.Tensor, alpha: float, reference: torch.Tensor | None = None, *,
                   margin: float = 0.05, dtype: torch.dtype = torch.float32, per_row: bool = False) -> torch.Tensor:
    """Latent weights ``W`` with ``clamp(round(W / mean|W|), -1, 1) == codes`` and ``mean|W| == alpha``.

    Each entry is ``sign * m * alpha``: zero codes get ``m <= 0.5 - margin``, nonzero ones ``m >= 0.5 +
    margin`` (so float32 rounding of the mean cannot flip a code); inside those bins ``m`` follows
    ``|reference| / alpha`` where given (keeping the latent ordering for later training), and the
    nonzero magnitudes are stretched about ``0.5 + margin`` so that the mean of ``m`` is exactly 1.

    Args:
        codes: int8 ``[out, in]`` in {-1, 0, 1}.
        alpha: the scale (> 0).
        reference: ``[out, in]`` weights whose magnitudes and signs (of zero codes) are kept where allowed.
        margin: distance kept from the rounding boundary 0.5, in units of ``alpha``.
        dtype: dtype of the result.
        per_row: encode for a per-row BitLinear (``gamma_r = mean|W_r|``): the mean of ``m`` is 1 in every row, so
            every row's scale is ``alpha``.

    Returns:
        ``[out, in]`` latent weights; all zeros when every code is zero (the layer outputs zero either way), and
        with ``per_row`` in every row whose codes are all zero.
    """
    if not 0 < margin < 0.5:
        raise ValueError(f"margin must be in (0, 0.5), got {margin}")
    if per_row:
        return _encode_rows(codes, alpha, reference, margin).to(dtype)
    c = codes.double()
    nz = c != 0
    if not nz.any():
        return torch.zeros(codes.shape, dtype=dtype)
    z0 = reference.detach().double() / alpha if reference is not None else c
    lo = 0.5 + margin
    m = torch.where(nz, z0.abs().clamp(min=lo), z0.abs().clamp(max=0.5 - margin))
    n = c.numel()
    zero_sum = m[~nz].sum()
    excess = (m[nz] - lo).sum()
    need = n - zero_sum - nz.sum() * lo  # what the nonzero magnitudes above lo must add up to (>= 0)
    if excess > 0:
        m[nz] = lo + (m[nz] - lo) * (need / excess)
    else:
        m[nz] = lo + need / nz.sum()
    sign = torch.where(nz, c.sign(), torch.where(z0 < 0, -1.0, 1.0))
    return (sign * m * alpha).to(dtype)


def _encode_rows(codes: torch.Tensor, alpha: float, reference: torch.Tensor | None, margin: float) -> torch.Tensor:
    """:func:`encode_ternary` with the mean of ``m`` fixed to 1 in each row (float64 ``[out, in]``)."""
    c = codes.double()
    nz = c != 0
    z0 = reference.detach().double() / alpha if reference is not None else c
    lo = 0.5 + margin
    m = torch.where(nz, z0.abs().clamp(min=lo), z0.abs().clamp(max=0.5 - margin))
    count = nz.sum(1, keepdim=True)
    zero_sum = torch.where(nz, 0.0, m).sum(1, keepdim=True)
    excess = torch.where(nz, m - lo, 0.0).sum(1, keepdim=True)
    need = c.shape[1] - zero_sum - count * lo  # per row, as in encode_ternary (>= 0)
    stretched = torch.where(excess > 0, lo + (m - lo) * (need / excess.clamp_min(1e-300)),
                            lo + need / count.clamp_min(1))
    m = torch.where(nz, stretched, m)
    sign = torch.where(nz, c.sign(), torch.where(z0 < 0, -1.0, 1.0))
    return torch.where(count > 0, sign * m * alpha, 0.0)
