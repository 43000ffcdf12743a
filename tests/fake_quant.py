"""The tests' independent BitNet b1.58 oracle: the detach-trick fake-quant linear most BitNet code uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ste_fake_quant_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x_q, W_q, b)`` in the inputs' dtype, with straight-through gradients to ``x`` and ``w``.

    ``x [..., K]``, ``w [N, K]``, ``b [N]``; written from the published formulas, not from bitdistill's code.
    """
    s = 127.0 / x.detach().abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xq = (x.detach() * s).round().clamp(-128, 127) / s
    g = w.detach().abs().mean().clamp(min=1e-5)
    wq = (w.detach() / g).round().clamp(-1, 1) * g
    return F.linear(x + (xq - x).detach(), w + (wq - w).detach(), b)
