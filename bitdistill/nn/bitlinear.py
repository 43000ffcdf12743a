"""``BitLinear``: a quantization-aware BitNet b1.58 drop-in for ``nn.Linear``.

Forward (see :mod:`bitdistill.quant.reference` for the quantizers)::

    y = (X_q @ T^T) * gamma / s_x + bias

Backward is the straight-through estimator: both quantizers are treated as the identity, so with
``x_q = X_q / s_x`` and ``W_q = T * gamma``::

    grad_x = grad_y @ W_q          grad_W = grad_y^T @ x_q          grad_b = sum(grad_y)

in the activation dtype; under autocast the two products run in autocast's dtype (as ``nn.Linear``'s do) and
``grad_x`` returns in the activation dtype, ``grad_W`` in the weight's. With ``per_row=True`` (``BitNetConfig(weight_scale="row")``) ``gamma`` is ``[out_features]``,
one absmean scale per output row, applied per output column of ``y``; everything else is unchanged.
:class:`BitLinearFunction` saves the int8 codes ``X_q`` and the per-token
scales ``s_x`` instead of the full-precision input (a quarter of an fp32 input's bytes, half of a
bf16 one's), plus ``gamma``; ``W_q`` is recomputed from the latent weight, which autograd keeps anyway.
"""

from __future__ import annotations

import torch
from torch import nn

from bitdistill import ops

__all__ = ["BitConv1D", "BitLinear", "BitLinearFunction", "BitRMSNorm", "bitlinear"]


class BitLinearFunction(torch.autograd.Function):
    """``y = BitLinear(x, W, b)`` on 2-D ``x [M, K]``, ``W [N, K]``, ``b [N]``; STE backward.

    ``per_row``: one weight scale per output row (``gamma [N]``) instead of one per tensor.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                per_row: bool = False) -> torch.Tensor:
        x_codes, x_scale = ops.activation_quant(x)
        w_codes, gamma = _ternarize(weight, per_row)
        y = ops.int8_ternary_linear(x_codes, x_scale, w_codes, gamma, bias, x.dtype)
        ctx.save_for_backward(x_codes, x_scale, weight, gamma)
        ctx.has_bias = bias is not None
        device = x.device.type
        ctx.grad_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x_codes, x_scale, weight, gamma = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        # under autocast both products run in its dtype, as an nn.Linear's backward does (a float32 input there
        # would otherwise keep float32 GEMMs: on a CPU with bfloat16 instructions a third of a KD step's time)
        grad_q = grad_y if ctx.grad_dtype is None else grad_y.to(ctx.grad_dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.ternary_grad_input(grad_q, weight, gamma).to(grad_y.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = ops.int8_grad_weight(grad_q, x_codes, x_scale).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum(0)
        return grad_x, grad_w, grad_b, None


def _ternarize(weight: torch.Tensor, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T int8 [N, K], gamma f32 [] or [N])``: from ``ops.weight_quant`` (``ops.weight_quant_per_row``), or from the
    weight itself when it carries them (the tensors of FSDP2's ternary all-gather, :mod:`bitdistill.fsdp.ternary`,
    whose gamma is exact over shards; one per tensor only)."""
    own = getattr(weight, "ternary_codes_and_scale", None)
    if own is not None:
        if per_row:
            raise ValueError("FSDP2's ternary all-gather carries one weight scale per tensor, and this BitLinear uses "
                             "one per row (weight_scale='row'); leave the ternary all-gather off for it")
        return own()
    return ops.weight_quant_per_row(weight) if per_row else ops.weight_quant(weight)


def _check_input(x: torch.Tensor, in_features: int, where: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"{where} expects input of shape (..., tokens, in_features) with at least 2 dims (activations are "
            f"quantized per token), got shape {tuple(x.shape)}; add a token dimension, e.g. x.unsqueeze(0)"
        )
    if x.shape[-1] != in_features:
        raise ValueError(
            f"{where} has in_features={in_features} but the input's last dimension is {x.shape[-1]} "
            f"(input shape {tuple(x.shape)}); pass activations of width {in_features}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{where} expects a floating-point input (float32/bfloat16/float16), got {x.dtype}")


def bitlinear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
              per_row: bool = False) -> torch.Tensor:
    """Functional BitLinear: ``x [..., K]``, ``weight [N, K]``, ``bias [N]`` -> ``[..., N]`` in ``x``'s dtype
    (``per_row``: one weight scale per output row)."""
    _check_input(x, weight.shape[1], "bitlinear")
    y = BitLinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, per_row)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class BitRMSNorm(nn.Module):
    """RMSNorm with the exact semantics of transformers' ``LlamaRMSNorm`` (which its BitLinear uses).

    ``y = weight * (x / sqrt(mean(x^2) + eps))``, normalized in float32 and cast back before the weight.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


class BitLinear(nn.Linear):
    """BitNet b1.58 linear layer: ternary weights, int8 per-token activations, STE gradients.

    A subclass of ``nn.Linear`` with the same parameters and state-dict keys (``weight`` is the latent
    full-precision weight ``[out_features, in_features]``), so existing code and checkpoints keep working.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        use_rms_norm: apply an RMSNorm with a learnable weight (key ``rms_norm.weight``, like
            transformers' BitLinear) to the input before activation quantization.
        rms_norm_eps: epsilon of that RMSNorm.
        per_row: one absmean weight scale per output row instead of one per tensor (not a tensor: the scales are
            recomputed from the latent weight every forward, like the per-tensor one).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        use_rms_norm: bool = False,
        rms_norm_eps: float = 1e-6,
        per_row: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.per_row = per_row
        self.use_rms_norm = use_rms_norm
        self.rms_norm = BitRMSNorm(in_features, rms_norm_eps, device=device, dtype=dtype) if use_rms_norm else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, use_rms_norm: bool = False, rms_norm_eps: float = 1e-6,
                    per_row: bool = False) -> BitLinear:
        """A BitLinear that shares ``linear``'s parameters (same tensors: device, dtype, requires_grad, ties kept)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"BitLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  use_rms_norm=False, per_row=per_row)
        new._adopt(linear.weight, linear.bias, use_rms_norm, rms_norm_eps)
        new.train(linear.training)
        return new

    def _adopt(self, weight: nn.Parameter, bias: nn.Parameter | None, use_rms_norm: bool, rms_norm_eps: float) -> None:
        self.weight = weight
        self.bias = bias
        self.use_rms_norm = use_rms_norm
        if use_rms_norm:
            self.rms_norm = BitRMSNorm(self.in_features, rms_norm_eps, device=weight.device, dtype=weight.dtype)

    def weight_out_in(self) -> torch.Tensor:
        """The latent weight as ``[out_features, in_features]`` (a view for :class:`BitConv1D`)."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_features, type(self).__name__)
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        y = BitLinearFunction.apply(x.reshape(-1, self.in_features), self.weight_out_in(), self.bias, self.per_row)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights=ternary(absmean, {'per-row' if self.per_row else 'per-tensor'}), "
                f"activations=int8(absmax, per-token), "
                f"use_rms_norm={self.use_rms_norm}")


class BitConv1D(BitLinear):
    """BitLinear for GPT-2 style ``Conv1D`` layers, keeping their transposed ``weight [in, out]`` layout.

    The parameter stays exactly as ``Conv1D`` stores it, so GPT-2 checkpoints load into it unchanged;
    the forward reads it through a transposed view.
    """

    @classmethod
    def from_conv1d(cls, conv: nn.Module, *, use_rms_norm: bool = False, rms_norm_eps: float = 1e-6,
                    per_row: bool = False) -> BitConv1D:
        """A BitConv1D sharing the parameters of a transformers ``Conv1D`` (``weight [in, out]``, ``bias [out]``)."""
        in_features, out_features = conv.weight.shape
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = in_features, out_features
        new.per_row = per_row
        new.rms_norm = None
        new._adopt(conv.weight, conv.bias, use_rms_norm, rms_norm_eps)
        new.train(conv.training)
        return new

    def weight_out_in(self) -> torch.Tensor:
        return self.weight.t()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", weight_layout=[in, out] (Conv1D)"
