"""Quantization warm-up: blend each BitLinear from full precision to ternary over the first N steps.

While warming up, a training-mode BitLinear returns ``y = lerp(y_fp, y_ternary, lam)`` with
``y_fp = x @ W^T + b`` (the latent weight, no quantization) and ``lam = min(1, step / N)``; gradients flow
through both terms. In eval mode, and from step N on, the layer is purely ternary, so evaluations
always measure the deployable student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitdistill.errors import UserError
from bitdistill.nn.bitlinear import BitLinear

__all__ = ["QuantWarmup"]


class QuantWarmup:
    """Forward hooks on every BitLinear of ``model`` implementing the blend; call :meth:`set_step` each step."""

    def __init__(self, model: nn.Module, steps: int) -> None:
        if steps <= 0:
            raise UserError(f"quantization warm-up needs a positive number of steps, got {steps}")
        self.steps = steps
        self.lam = 0.0
        self._handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, BitLinear)]
        if not self._handles:
            raise UserError("quantization warm-up found no BitLinear layer; convert the student first")

    def set_step(self, step: int) -> None:
        """Set the blend for optimizer step ``step`` (0-based)."""
        self.lam = min(1.0, step / self.steps)

    def _hook(self, module: BitLinear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or self.lam >= 1.0:
            return None
        x = inputs[0]
        if module.rms_norm is not None:
            x = module.rms_norm(x)
        fp = F.linear(x, module.weight_out_in(), module.bias)
        return torch.lerp(fp, output, self.lam)

    def remove(self) -> None:
        """Remove the hooks (the model is then purely ternary)."""
        for h in self._handles:
            h.remove()
        self._handles = []
