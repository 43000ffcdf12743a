"""``PackedBitLinear``: inference-only BitNet b1.58 linear layer on resident 2-bit packed weights.

It holds exactly the tensors of the Hugging Face ``bitnet`` format (``linear_class: "bitlinear"``):
``weight`` ``uint8 [out/4, in]`` (see :mod:`bitdistill.quant.packing` for the layout),
``weight_scale`` ``[1]`` = ``1 / gamma`` (``[out]``, one per output row, for a per-row student: bitdistill's
extension of the format, ``docs/pack.md``), an optional ``bias`` and an optional in-layer RMSNorm
(``rms_norm.weight``), so its state dict is the packed checkpoint's. Forward::

    y = (X_q @ T^T) / (s_x * weight_scale) + bias

through ``bitdistill.ops.packed_linear`` (CPU: :mod:`bitdistill.cpu_ext`, unpacking in
registers; CUDA: the Triton kernel when registered). In eager mode on CPU the forward calls the op's CPU
implementation directly, skipping the dispatcher's per-call overhead; under ``torch.compile`` and on
other devices it calls the op. The packed bytes are the only copy of the weight:
1/8 of bf16 for the weight itself.
"""

from __future__ import annotations

import torch
from torch import nn

from bitdistill import ops
from bitdistill.cpu_ext import packed_linear_cpu
from bitdistill.nn.bitlinear import BitLinear, BitRMSNorm, _check_input
from bitdistill.quant.packing import pack_ternary, unpack_ternary
from bitdistill.quant.reference import weight_quant

__all__ = ["PackedBitLinear"]


class PackedBitLinear(nn.Module):
    """Inference-only packed ternary linear layer (buffers, no parameters, no gradients).

    Args:
        in_features, out_features: sizes; ``out_features % 4 == 0``.
        bias: whether the layer has a bias (float buffer ``[out_features]``).
        use_rms_norm, rms_norm_eps: in-layer RMSNorm before activation quantization (as BitLinear).
        per_row: one weight scale per output row (``weight_scale [out_features]``) instead of ``[1]``.
        device, dtype: of the float tensors (bias, RMSNorm weight); ``weight_scale`` is float32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, use_rms_norm: bool = False,
                 rms_norm_eps: float = 1e-6, per_row: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if out_features % 4 != 0:
            raise ValueError(f"PackedBitLinear needs out_features % 4 == 0 (4 rows per byte), got {out_features}; "
                             "keep this layer in full precision")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features // 4, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features if per_row else 1, dtype=torch.float32,
                                                        device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.use_rms_norm = use_rms_norm
        self.rms_norm = BitRMSNorm(in_features, rms_norm_eps, device=device, dtype=dtype) if use_rms_norm else None
        if self.rms_norm is not None:
            self.rms_norm.requires_grad_(False)

    @classmethod
    def like(cls, layer: nn.Module, *, device=None, dtype=None) -> PackedBitLinear:
        """An empty (zero-code) PackedBitLinear with ``layer``'s geometry: features, bias, in-layer RMSNorm and eps,
        per-row scales (``layer.per_row``; a layer without the attribute has one scale per tensor).

        ``layer`` is any linear-like module with ``in_features``, ``out_features``, ``bias`` and ``rms_norm``
        (``None`` or a norm with ``variance_epsilon``): our BitLinear, transformers' packed BitLinear. The one
        place a PackedBitLinear is built from another layer; the caller fills in (or assigns) the tensors.
        """
        rms = getattr(layer, "rms_norm", None)
        return cls(layer.in_features, layer.out_features, bias=layer.bias is not None, use_rms_norm=rms is not None,
                   rms_norm_eps=rms.variance_epsilon if rms is not None else 1e-6,
                   per_row=bool(getattr(layer, "per_row", False)), device=device, dtype=dtype)

    @property
    def per_row(self) -> bool:
        """Whether the layer has one weight scale per output row (``weight_scale [out_features]``)."""
        return self.weight_scale.numel() != 1

    @classmethod
    def from_bitlinear(cls, layer: BitLinear) -> PackedBitLinear:
        """Pack a trained :class:`BitLinear` (its latent weight is ternarized; ``layer`` is not modified)."""
        w = layer.weight_out_in().detach()
        if not torch.isfinite(w).all():
            raise ValueError("cannot pack a BitLinear whose weight contains NaN or Inf")
        codes, gamma = weight_quant(w, layer.per_row)
        rms = layer.rms_norm
        new = cls.like(layer, device=w.device, dtype=w.dtype)
        new.weight.copy_(pack_ternary(codes))
        new.weight_scale.copy_((1.0 / gamma).reshape(-1))
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach())
        if rms is not None:
            new.rms_norm.weight.data.copy_(rms.weight.detach())
        return new

    def to_bitlinear(self, dtype: torch.dtype = torch.float32) -> BitLinear:
        """A :class:`BitLinear` computing the same function, for further training.

        Its latent weight is ``T * gamma / f`` with ``f`` the fraction of non-zero codes, so that
        ``mean(|W|) = gamma`` and ternarization gives back ``T`` and (up to float32 rounding of the
        mean, and of ``dtype``) ``gamma``; per row (``gamma_r``, ``f_r``) for a per-row layer.
        """
        codes = unpack_ternary(self.weight, torch.float32)
        if self.per_row:
            gamma = 1.0 / self.weight_scale.float().reshape(-1, 1)
            nonzero = codes.abs().mean(dim=1, keepdim=True).clamp_(min=1.0 / codes.shape[1])
        else:
            gamma = 1.0 / self.weight_scale.float().reshape(())
            nonzero = codes.abs().mean().clamp_(min=1.0 / codes.numel())
        w = codes * (gamma / nonzero)
        rms = self.rms_norm
        layer = BitLinear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
                          dtype=dtype, use_rms_norm=rms is not None,
                          rms_norm_eps=rms.variance_epsilon if rms is not None else 1e-6, per_row=self.per_row)
        with torch.no_grad():
            layer.weight.copy_(w)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
            if rms is not None:
                layer.rms_norm.weight.copy_(rms.weight)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_features, type(self).__name__)
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        x2d = x.reshape(-1, self.in_features)
        if x2d.device.type == "cpu" and not torch.compiler.is_compiling():
            # Eager CPU: the op's CPU implementation without the custom-op dispatcher (~40 us a call,
            # as much as the GEMV itself at decode time). Same function, same result.
            y = packed_linear_cpu(x2d, self.weight, self.weight_scale, self.bias)
        else:
            y = ops.packed_linear(x2d, self.weight, self.weight_scale, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights=ternary packed 4/byte, {'per-row' if self.per_row else 'per-tensor'} scales, "
                f"use_rms_norm={self.use_rms_norm}")
