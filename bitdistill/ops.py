"""Dispatch: every BitNet op exists once as a ``torch.library`` custom op.

Each op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces through it,
and a default implementation that is the pure-torch reference of :mod:`bitdistill.quant` (the CPU
path). Device backends (Triton, the optional CUDA extension) register themselves as the CUDA kernel
of an op from :mod:`bitdistill.kernels`; nothing CUDA-only is imported here.

All ops take 2-D activations ``[M, K]``; :class:`bitdistill.nn.BitLinear` flattens leading dims.

=========================  =========================================================================
op                         computes
=========================  =========================================================================
``activation_quant``       ``x [M,K] -> (X_q int8 [M,K], s_x f32 [M,1])``
``weight_quant``           ``W [N,K] -> (T int8 [N,K], gamma f32 [])``
``int8_ternary_linear``    ``(X_q @ T^T) * gamma / s_x + bias -> [M,N]`` in ``out_dtype``
``ternary_grad_input``     ``grad_y [M,N] @ (T * gamma) -> [M,K]`` in ``grad_y``'s dtype
``int8_grad_weight``       ``grad_y^T [N,M] @ (X_q / s_x) -> [N,K]`` in ``grad_y``'s dtype
``packed_linear``          ``(X_q @ unpack(P)^T) / (s_x * weight_scale) + bias -> [M,N]``
=========================  =========================================================================
"""

from __future__ import annotations

import torch

from bitdistill.quant import packing, reference

__all__ = [
    "activation_quant",
    "int8_grad_weight",
    "int8_ternary_linear",
    "packed_linear",
    "ternary_grad_input",
    "weight_quant",
]


@torch.library.custom_op("bitdistill::activation_quant", mutates_args=())
def activation_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.activation_quant(x)


@activation_quant.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("bitdistill::weight_quant", mutates_args=())
def weight_quant(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.weight_quant(weight)


@weight_quant.register_fake
def _(weight):
    return weight.new_empty(weight.shape, dtype=torch.int8), weight.new_empty((), dtype=torch.float32)


@torch.library.custom_op("bitdistill::int8_ternary_linear", mutates_args=())
def int8_ternary_linear(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    w_codes: torch.Tensor,
    gamma: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    y = reference.int_matmul(x_codes, w_codes).mul_(gamma / x_scale)
    if bias is not None:
        y = y.add_(bias.float())
    return y.to(out_dtype)


@int8_ternary_linear.register_fake
def _(x_codes, x_scale, w_codes, gamma, bias, out_dtype):
    return x_codes.new_empty((x_codes.shape[0], w_codes.shape[0]), dtype=out_dtype)


def _dequant_ternary(weight: torch.Tensor, gamma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``T * gamma`` recomputed from the latent weight and its saved ``gamma``: ``[N, K]`` in ``dtype``."""
    return (torch.round(weight.float() / gamma).clamp_(-1, 1).mul_(gamma)).to(dtype)


@torch.library.custom_op("bitdistill::ternary_grad_input", mutates_args=())
def ternary_grad_input(grad_y: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    return grad_y @ _dequant_ternary(weight, gamma, grad_y.dtype)


@ternary_grad_input.register_fake
def _(grad_y, weight, gamma):
    return grad_y.new_empty((grad_y.shape[0], weight.shape[1]))


@torch.library.custom_op("bitdistill::int8_grad_weight", mutates_args=())
def int8_grad_weight(grad_y: torch.Tensor, x_codes: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    x_q = (x_codes.float() / x_scale).to(grad_y.dtype)
    return grad_y.t() @ x_q


@int8_grad_weight.register_fake
def _(grad_y, x_codes, x_scale):
    return grad_y.new_empty((grad_y.shape[1], x_codes.shape[1]))


@torch.library.custom_op("bitdistill::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if x.device.type == "cpu":
        from bitdistill.nn.packed_cpu import packed_linear_cpu

        return packed_linear_cpu(x, packed, weight_scale, bias)
    return packing.packed_linear_reference(x, packed, weight_scale, bias)


@packed_linear.register_fake
def _(x, packed, weight_scale, bias):
    return x.new_empty((x.shape[0], packed.shape[0] * 4))
