"""Dispatch: every BitNet op exists once as a ``torch.library`` custom op.

Each op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces through it,
and a default implementation that is the pure-torch reference of :mod:`bitdistill.quant` (the CPU
path; ``int8_ternary_linear`` forms its exact integer product with ``torch._int_mm`` on CPUs where a probe
finds that exact, the same result bit for bit, see :func:`cpu_int_mm_exact`). Device backends (Triton, the optional CUDA extension) register themselves as the CUDA kernel
of an op from :mod:`bitdistill.kernels`; nothing CUDA-only is imported here.

All ops take 2-D activations ``[M, K]``; :class:`bitdistill.nn.BitLinear` flattens leading dims.

Backends. On CUDA each op runs the Triton kernel of :mod:`bitdistill.kernels` (imported lazily, on the
first CUDA call). The environment variable ``BITDISTILL_BACKEND`` picks the backend at call time:

* unset or ``auto``: Triton when it is installed, else the reference; for ``packed_linear`` with at
  most :data:`CUDA_EXT_MAX_TOKENS` tokens, the CUDA C++ extension ``bitdistill._C`` when it is built
  (it measured faster than the Triton GEMV at every decode shape on an H100, see docs/cuda.md);
* ``triton``: Triton (an error if it is not installed);
* ``cuda``: the CUDA C++ extension for ``packed_linear`` at every token count (an error naming how
  to build it if it is missing), Triton for the other ops;
* ``reference``: the pure-torch reference on every device (on CPU: ``int8_ternary_linear``'s float32 product
  instead of ``torch._int_mm``, the same result).

Inputs the kernels do not take (dtypes other than float32/bfloat16/float16) run the reference on CUDA too.
Per-row weight scales (``gamma [N]``, ``weight_scale [N]``: ``BitNetConfig(weight_scale="row")``) run the reference
on every device: the Triton and CUDA kernels take one scale per tensor, and ``weight_quant_per_row`` has no
kernel at all (the dispatch below routes on the scale's size, never by accident).
:func:`_packed_linear_backend` is the single place where the packed inference backend is chosen.

=========================  =========================================================================
op                         computes
=========================  =========================================================================
``activation_quant``       ``x [M,K] -> (X_q int8 [M,K], s_x f32 [M,1])``
``weight_quant``           ``W [N,K] -> (T int8 [N,K], gamma f32 [])``
``weight_quant_per_row``   ``W [N,K] -> (T int8 [N,K], gamma f32 [N])``, one absmean scale per output row
``int8_ternary_linear``    ``(X_q @ T^T) * gamma / s_x + bias -> [M,N]`` in ``out_dtype``
``ternary_grad_input``     ``grad_y [M,N] @ (T * gamma) -> [M,K]`` in ``grad_y``'s dtype
``int8_grad_weight``       ``grad_y^T [N,M] @ (X_q / s_x) -> [N,K]`` in ``grad_y``'s dtype
``packed_linear``          ``(X_q @ unpack(P)^T) / (s_x * weight_scale) + bias -> [M,N]``
=========================  =========================================================================
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable

import torch

from bitdistill.quant import packing, reference

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "CUDA_EXT_MAX_TOKENS",
    "activation_quant",
    "backend",
    "cpu_int_mm_exact",
    "int8_grad_weight",
    "int8_ternary_linear",
    "packed_linear",
    "ternary_grad_input",
    "weight_quant",
    "weight_quant_per_row",
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


@torch.library.custom_op("bitdistill::weight_quant_per_row", mutates_args=())
def weight_quant_per_row(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.weight_quant(weight, per_row=True)


@weight_quant_per_row.register_fake
def _(weight):
    return weight.new_empty(weight.shape, dtype=torch.int8), weight.new_empty(weight.shape[:1], dtype=torch.float32)


@torch.library.custom_op("bitdistill::int8_ternary_linear", mutates_args=())
def int8_ternary_linear(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    w_codes: torch.Tensor,
    gamma: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _int8_ternary_linear_reference(x_codes, x_scale, w_codes, gamma, bias, out_dtype)


def _int8_ternary_linear_reference(x_codes, x_scale, w_codes, gamma, bias, out_dtype):
    return _dequant_int_product(reference.int_matmul(x_codes, w_codes), x_scale, gamma, bias, out_dtype)


def _dequant_int_product(acc, x_scale, gamma, bias, out_dtype):
    """``acc [M, N]`` (float32 holding ``X_q @ T^T``) ``* gamma / s_x + bias`` in ``out_dtype`` (``gamma`` 0-dim or ``[N]``)."""
    y = acc.div_(x_scale * (1.0 / gamma.reshape(-1)))  # the packed format's order
    if bias is not None:
        y = y.add_(bias.float())
    return y.to(out_dtype)


@functools.cache
def cpu_int_mm_exact() -> bool:
    """Whether ``torch._int_mm`` on this CPU returns the exact int32 product of int8 operands.

    oneDNN's int8 GEMM is exact on CPUs with VNNI/AMX; CPUs whose kernel saturates 16-bit partial sums
    (reported on AVX2-only CPUs) fail this probe and keep the float32 path. The probe uses the extreme values
    BitLinear can produce (codes +-127, ternary +-1, all alike), and an odd shape (one token, 7 -> 3
    features): a build whose CPU ``_int_mm`` refuses a shape raises ``RuntimeError`` here, once, and keeps the
    float32 path rather than failing inside a forward.
    """
    x = torch.full((17, 4096), 127, dtype=torch.int8)
    x[1::2] = -127
    w = torch.ones((16, 4096), dtype=torch.int8)
    w[1::2] = -1
    cases = [(x, w), (x[:1, :7], w[:3, :7])]
    try:
        products = [(torch._int_mm(a, b.t()), a.long() @ b.long().t()) for a, b in cases]
        why = None if all(torch.equal(got.to(torch.int64), want) for got, want in products) else "gave inexact sums"
    except RuntimeError as exc:  # NotImplementedError (no CPU kernel) is a RuntimeError too
        why = f"refused the probe ({exc})"
    if why is not None:
        logger.info("BitLinear's CPU integer product stays a float32 matmul (same numbers, no int8 GEMM speed-up): "
                    "torch._int_mm %s", why)
    return why is None


@int8_ternary_linear.register_kernel("cpu")
def _(x_codes, x_scale, w_codes, gamma, bias, out_dtype):
    # ``X_q @ T^T`` in int32 is the exact product the reference forms in float32 (or float64 for long K),
    # several times faster on CPUs with int8 dot-product instructions; the int32 -> float32 cast rounds it like
    # the reference's float64 -> float32 one, so the result is the same bit for bit.
    if x_codes.shape[0] == 0 or _requested() == "reference" or not cpu_int_mm_exact():
        return _int8_ternary_linear_reference(x_codes, x_scale, w_codes, gamma, bias, out_dtype)
    return _dequant_int_product(torch._int_mm(x_codes, w_codes.t()).float(), x_scale, gamma, bias, out_dtype)


@int8_ternary_linear.register_fake
def _(x_codes, x_scale, w_codes, gamma, bias, out_dtype):
    return x_codes.new_empty((x_codes.shape[0], w_codes.shape[0]), dtype=out_dtype)


def _dequant_ternary(weight: torch.Tensor, gamma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``T * gamma`` recomputed from the latent weight and its saved ``gamma`` (0-dim or ``[N]``): ``[N, K]`` in ``dtype``."""
    gamma = gamma.reshape(-1, 1)
    return (weight.float() / gamma).round_().clamp_(-1, 1).mul_(gamma).to(dtype)


@torch.library.custom_op("bitdistill::ternary_grad_input", mutates_args=())
def ternary_grad_input(grad_y: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    return _ternary_grad_input_reference(grad_y, weight, gamma)


def _ternary_grad_input_reference(grad_y, weight, gamma):
    return grad_y @ _dequant_ternary(weight, gamma, grad_y.dtype)


@ternary_grad_input.register_fake
def _(grad_y, weight, gamma):
    return grad_y.new_empty((grad_y.shape[0], weight.shape[1]))


@torch.library.custom_op("bitdistill::int8_grad_weight", mutates_args=())
def int8_grad_weight(grad_y: torch.Tensor, x_codes: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    return _int8_grad_weight_reference(grad_y, x_codes, x_scale)


def _int8_grad_weight_reference(grad_y, x_codes, x_scale):
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
        from bitdistill.cpu_ext import packed_linear_cpu

        return packed_linear_cpu(x, packed, weight_scale, bias)
    return packing.packed_linear_reference(x, packed, weight_scale, bias)


@packed_linear.register_fake
def _(x, packed, weight_scale, bias):
    return x.new_empty((x.shape[0], packed.shape[0] * 4))


# ---------------------------------------------------------------------------------------------------------
# CUDA dispatch

BACKENDS = ("auto", "triton", "cuda", "reference")
# packed_linear on CUDA goes to the CUDA C++ extension up to this many tokens under BITDISTILL_BACKEND=auto.
CUDA_EXT_MAX_TOKENS = 16
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _requested() -> str:
    name = os.environ.get("BITDISTILL_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"BITDISTILL_BACKEND={name!r} is not a backend; use one of {', '.join(BACKENDS)}")
    return name


def backend() -> str:
    """The backend CUDA calls of the Triton-backed ops use now: ``"triton"`` or ``"reference"``.

    From ``BITDISTILL_BACKEND``; ``cuda`` means Triton here (the extension only implements ``packed_linear``).
    """
    name = _requested()
    if name == "cuda":
        name = "triton"
    if name == "auto":
        return "triton" if importlib.util.find_spec("triton") is not None else "reference"
    if name == "triton" and importlib.util.find_spec("triton") is None:
        raise RuntimeError("BITDISTILL_BACKEND=triton but Triton is not installed; "
                           "pip install 'bitdistill[triton]' or set BITDISTILL_BACKEND=reference")
    return name


def _kernel(module: str, name: str) -> Callable:
    """``bitdistill.kernels.<module>.<name>``, imported on first use (Triton loads only then)."""
    return getattr(importlib.import_module(f"bitdistill.kernels.{module}"), name)


def _use_triton(*float_tensors: torch.Tensor | None) -> bool:
    return backend() == "triton" and all(t is None or t.dtype in _KERNEL_DTYPES for t in float_tensors)


def _per_tensor(scale: torch.Tensor) -> bool:
    """Whether a weight scale (``gamma`` or ``weight_scale``) is one per tensor, the only kind the kernels take."""
    return scale.numel() == 1


@activation_quant.register_kernel("cuda")
def _(x):
    if _use_triton(x):
        return _kernel("quant", "activation_quant")(x)
    return reference.activation_quant(x)


@weight_quant.register_kernel("cuda")
def _(weight):
    if _use_triton(weight):
        return _kernel("quant", "weight_quant")(weight)
    return reference.weight_quant(weight)


@int8_ternary_linear.register_kernel("cuda")
def _(x_codes, x_scale, w_codes, gamma, bias, out_dtype):
    if out_dtype in _KERNEL_DTYPES and _per_tensor(gamma) and _use_triton(bias):
        return _kernel("linear", "int8_ternary_linear")(x_codes, x_scale, w_codes, gamma, bias, out_dtype)
    return _int8_ternary_linear_reference(x_codes, x_scale, w_codes, gamma, bias, out_dtype)


@ternary_grad_input.register_kernel("cuda")
def _(grad_y, weight, gamma):
    if _per_tensor(gamma) and _use_triton(grad_y, weight):
        return _kernel("linear", "ternary_grad_input")(grad_y, weight, gamma)
    return _ternary_grad_input_reference(grad_y, weight, gamma)


@int8_grad_weight.register_kernel("cuda")
def _(grad_y, x_codes, x_scale):
    if _use_triton(grad_y):
        return _kernel("linear", "int8_grad_weight")(grad_y, x_codes, x_scale)
    return _int8_grad_weight_reference(grad_y, x_codes, x_scale)


def _packed_linear_backend(x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor) -> Callable:
    """The implementation ``impl(x2d, packed, weight_scale, bias)`` that runs ``packed_linear`` on CUDA.

    The one place where the packed inference backend is chosen: the CUDA C++ extension, the Triton
    GEMV/GEMM, or the reference (see the module docstring for the rule; per-row scales: the reference).
    """
    from bitdistill import cuda_ext

    if not _per_tensor(weight_scale):
        return packing.packed_linear_reference
    name = _requested()
    if name == "cuda":
        cuda_ext.load()
        return cuda_ext.packed_linear_cuda
    if (name == "auto" and x.dtype in _KERNEL_DTYPES and x.shape[0] <= CUDA_EXT_MAX_TOKENS
            and x.shape[1] % 4 == 0 and cuda_ext.is_available()):
        return cuda_ext.packed_linear_cuda
    if _use_triton(x):
        return _kernel("packed", "packed_linear")
    return packing.packed_linear_reference


@packed_linear.register_kernel("cuda")
def _(x, packed, weight_scale, bias):
    return _packed_linear_backend(x, packed, weight_scale)(x, packed, weight_scale, bias)
