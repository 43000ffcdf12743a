"""Ternary all-gather for FSDP2: ranks gather 2-bit codes and one exact absmean, not float latent weights.

A BitLinear forward needs only ``T = clamp(round(W / gamma), -1, 1)`` and ``gamma = max(mean|W|, 1e-5)``. With
:func:`use_ternary_all_gather`, each BitLinear weight becomes a :class:`TernaryLatentWeight` (the latent weight,
wrapped), and FSDP2's all-gather extension (``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``, the mechanism
torchao's BitNet training uses) sends per rank:

1. an **exact summary of the shard's absolute values**: the int64 sums, per group of eight binary exponents, of
   the float32 mantissas of ``|W|`` (:func:`abs_sum_summary`, 35 integers). Integer sums are associative, so the
   all-reduced summary is the same integers whatever the summation order or the number of ranks, and ``gamma``
   (:func:`gamma_from_summary`) is the same float32 on every rank and in the unsharded computation, bit for bit.
   (Float64 partial sums would be right to about 1e-16, but their rounding still depends on the order; the integers
   do not.) This ``gamma`` is the correctly rounded mean to about 1e-15; the default BitLinear path's float32
   ``mean`` can differ from it in the last bit.
2. the shard's codes, four per byte (:func:`bitdistill.quant.packing.pack_ternary` along ``in_features``):
   ``out * in / 4`` bytes for the whole weight instead of ``4 * out * in`` (float32) or ``2 * out * in`` (bf16).

After the gather the unsharded parameter is a :class:`PackedTernaryWeight`; BitLinear takes its codes and
``gamma`` through ``ternary_codes_and_scale`` and computes exactly what it computes from a
:class:`TernaryLatentWeight` in one process. Gradients, the reduce-scatter and the optimizer are unchanged (float
gradients of the latent weights). Opt-in: it is measured here for bytes, not yet for speed on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import nn

from bitdistill.errors import UserError
from bitdistill.nn.bitlinear import BitConv1D, BitLinear
from bitdistill.quant.packing import pack_ternary, unpack_ternary
from bitdistill.quant.reference import EPS

__all__ = [
    "SUMMARY_BUCKETS",
    "CommCounter",
    "PackedTernaryWeight",
    "TernaryLatentWeight",
    "abs_sum_summary",
    "all_gather_bytes",
    "gamma_from_summary",
    "latent_state_dict",
    "ternary_codes_exact",
    "use_ternary_all_gather",
]

aten = torch.ops.aten

# float32 |w| = mantissa * 2**(e - 24) with an integer mantissa < 2**24 and e in [-148, 128] (frexp's exponent):
# 277 exponents, eight per bucket, each mantissa shifted by (e + 148) % 8 < 2**31, so a bucket sums < 2**32 values
# in int64 without overflow.
_GROUP = 8
_LOWEST = 148 + 24
SUMMARY_BUCKETS = (128 + 148) // _GROUP + 1
_MAX_NUMEL = 2**32


def abs_sum_summary(weight: torch.Tensor) -> torch.Tensor:
    """The exact sum of ``|weight|`` as int64 ``[SUMMARY_BUCKETS]``: bucket ``b`` weighs ``2**(8 b - 172)``.

    Args:
        weight: any shape, float32/bfloat16/float16 (converted to float32 exactly), finite, fewer than 2**32 values.
    """
    if weight.numel() >= _MAX_NUMEL:
        raise ValueError(f"abs_sum_summary sums fewer than 2**32 values, got {weight.numel()}")
    mantissa, exponent = torch.frexp(weight.detach().float().abs().flatten())
    idx = (exponent + 148).clamp_(min=0)  # zeros have exponent 0 and mantissa 0
    value = torch.ldexp(mantissa, torch.tensor(24, device=weight.device)).to(torch.int64) << (idx % _GROUP)
    return torch.zeros(SUMMARY_BUCKETS, dtype=torch.int64, device=weight.device).index_add_(0, idx // _GROUP, value)


def gamma_from_summary(summary: torch.Tensor, numel: int) -> torch.Tensor:
    """``max(mean|W|, 1e-5)`` as a float32 0-dim tensor from an :func:`abs_sum_summary` of all ``numel`` values.

    A deterministic function of the integers: the same summary gives the same bits on every rank.
    """
    weights = torch.ldexp(torch.ones(SUMMARY_BUCKETS, dtype=torch.float64, device=summary.device),
                          torch.arange(SUMMARY_BUCKETS, device=summary.device) * _GROUP - _LOWEST)
    return ((summary.double() * weights).sum() / numel).float().clamp_(min=EPS)


def ternary_codes_exact(weight: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``clamp(round(W / gamma), -1, 1)`` as int8, the reference's formula (round half to even), same shape."""
    return (weight.detach().float() / gamma).round_().clamp_(-1, 1).to(torch.int8)


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """int8 ``[rows, K]`` (``K % 4 == 0``) -> uint8 ``[rows, K / 4]``: four codes of a row per byte."""
    return pack_ternary(codes.t()).t().contiguous()


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_rows`: uint8 ``[N, K / 4]`` -> int8 ``[N, K]``."""
    return unpack_ternary(packed.t().contiguous()).t()


_WRAPPING_OPS = {aten.t.default, aten.detach.default, aten.empty_like.default, aten.new_zeros.default,
                 aten.new_empty.default, aten.slice.Tensor, aten.view.default, aten.as_strided.default,
                 aten._to_copy.default, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
                 aten.narrow.default, aten.clone.default, aten.alias.default, aten._pin_memory.default}


class TernaryLatentWeight(torch.Tensor):
    """A BitLinear's latent weight ``[out, in]`` whose FSDP2 all-gather sends 2-bit codes and an exact absmean.

    Every op runs on the wrapped float tensor (so optimizers, ``copy_`` and state dicts see the latent weight);
    views, slices and copies stay wrapped so FSDP2's shard of it keeps the all-gather extension.
    """

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(), dtype=data.dtype,
                                                   device=data.device, requires_grad=data.requires_grad)

    def __init__(self, data: torch.Tensor) -> None:
        self._data = data

    def __tensor_flatten__(self):
        return ["_data"], None

    @classmethod
    def __tensor_unflatten__(cls, inner, meta, outer_size, outer_stride):
        return cls(inner["_data"])

    def __repr__(self) -> str:
        return f"TernaryLatentWeight({self._data!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*pytree.tree_map_only(cls, lambda t: t._data, args),
                   **pytree.tree_map_only(cls, lambda t: t._data, kwargs))
        if func is aten.copy_.default:
            return args[0]
        if func in _WRAPPING_OPS:
            return pytree.tree_map_only(torch.Tensor, cls, out)
        return out

    def ternary_codes_and_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes int8 [out, in], gamma f32 [])`` of the whole weight (one process: this tensor is all of it)."""
        gamma = gamma_from_summary(abs_sum_summary(self._data), self._data.numel())
        return ternary_codes_exact(self._data, gamma), gamma

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """All-reduce the shard's exact summary (a blocking collective), then hand FSDP the packed shard codes."""
        import torch.distributed as dist

        summary = abs_sum_summary(self._data)
        dist.all_reduce(summary, group=mesh.get_group())
        gamma = gamma_from_summary(summary, outer_size.numel())
        return (_pack_rows(ternary_codes_exact(self._data, gamma)),), (gamma,)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (packed,) = all_gather_outputs
        (gamma,) = metadata
        if out is not None:
            out._gamma = gamma
            return None
        return PackedTernaryWeight(packed, gamma, param_dtype), all_gather_outputs


class PackedTernaryWeight(torch.Tensor):
    """The all-gathered weight: uint8 codes ``[out, in / 4]`` and ``gamma``, posing as a ``[out, in]`` weight.

    BitLinear reads ``ternary_codes_and_scale``; any other op sees the dequantized ``T * gamma`` (in the backward,
    ``ternary_grad_input`` recomputes exactly ``T * gamma`` from it, as from the latent weight).
    """

    @staticmethod
    def __new__(cls, packed: torch.Tensor, gamma: torch.Tensor, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(cls, (packed.shape[0], packed.shape[1] * 4), dtype=dtype,
                                                   device=packed.device)

    def __init__(self, packed: torch.Tensor, gamma: torch.Tensor, dtype: torch.dtype) -> None:
        self._packed = packed
        self._gamma = gamma

    def __tensor_flatten__(self):
        return ["_packed", "_gamma"], self.dtype

    @classmethod
    def __tensor_unflatten__(cls, inner, dtype, outer_size, outer_stride):
        return cls(inner["_packed"], inner["_gamma"], dtype)

    def __repr__(self) -> str:
        return f"PackedTernaryWeight(shape={tuple(self.shape)}, gamma={float(self._gamma)})"

    def ternary_codes_and_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes int8 [out, in], gamma f32 [])``, unpacked from the gathered bytes."""
        return _unpack_rows(self._packed), self._gamma

    def dequantize(self) -> torch.Tensor:
        """``T * gamma`` ``[out, in]`` in this weight's dtype (computed in float32, as BitLinear does)."""
        return _unpack_rows(self._packed).float().mul_(self._gamma).to(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default, aten.as_strided.default):
            return cls(args[0]._packed, args[0]._gamma, args[0].dtype)
        return func(*pytree.tree_map_only(cls, lambda t: t.dequantize(), args),
                    **pytree.tree_map_only(cls, lambda t: t.dequantize(), kwargs))


def _eligible(module: nn.Module, world_size: int) -> str | None:
    """Why ``module``'s weight cannot take the ternary all-gather on ``world_size`` ranks, or ``None``."""
    if type(module) is not BitLinear or isinstance(module, BitConv1D):
        return "not a BitLinear with an [out, in] weight"
    if module.per_row:
        return "per-row weight scales (the ternary all-gather carries one scale per tensor)"
    out_features, in_features = module.weight.shape
    if in_features % 4:
        return f"in_features={in_features} is not a multiple of 4 (four codes a byte)"
    if out_features % world_size:
        return f"out_features={out_features} does not split evenly over {world_size} ranks"
    return None


def use_ternary_all_gather(model: nn.Module, world_size: int | None = None) -> dict[str, str]:
    """Wrap every eligible BitLinear weight of ``model`` (in place) as a :class:`TernaryLatentWeight`.

    Call it before ``fully_shard``. A weight whose ``in_features`` is not a multiple of 4, or whose ``out_features``
    does not split evenly over the ranks (FSDP2 pads such shards, which a packed gather cannot express), keeps the
    plain gather. Returns ``{module name: why it kept the plain gather}`` for BitLinear modules left alone.
    """
    if world_size is None:
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_initialized() else 1
    kept: dict[str, str] = {}
    converted = 0
    for name, module in model.named_modules():
        if not isinstance(module, BitLinear):
            continue
        if isinstance(module.weight, TernaryLatentWeight):
            converted += 1
            continue
        why = _eligible(module, world_size)
        if why is not None:
            kept[name] = why
            continue
        weight = module.weight
        module.weight = nn.Parameter(TernaryLatentWeight(weight.detach()), requires_grad=weight.requires_grad)
        converted += 1
    if not converted:
        raise UserError(f"the ternary all-gather found no eligible BitLinear weight in {type(model).__name__} "
                        "(convert it with replace_linear_with_bitlinear first, or leave ternary_all_gather off)")
    return kept


def latent_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every :class:`TernaryLatentWeight` replaced by its plain latent tensor (a new dict)."""
    return {k: v._data if isinstance(v, TernaryLatentWeight) else v for k, v in state.items()}


@dataclass
class CommCounter:
    """Bytes this rank's collectives move, by kind (``all_gather``, ``reduce_scatter``, ``all_reduce``).

    ``received[kind]`` adds up each collective's output bytes (an all-gather's: the whole gathered tensor) and
    ``sent[kind]`` its input bytes; a ring all-gather moves ``(world - 1) / world`` of its output over each link.
    """

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, sent: torch.Tensor, received: torch.Tensor) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + sent.numel() * sent.element_size()
        self.received[kind] = self.received.get(kind, 0) + received.numel() * received.element_size()
        self.calls[kind] = self.calls.get(kind, 0) + 1

    @contextmanager
    def counting(self) -> Iterator[CommCounter]:
        """Count every collective FSDP2 and the ternary all-gather issue inside the block (patches
        ``torch.distributed``'s functions for its duration)."""
        import torch.distributed as dist

        originals = {name: getattr(dist, name) for name in
                     ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
                      "reduce_scatter_tensor", "all_reduce") if hasattr(dist, name)}

        def gather(fn):
            def wrapped(output_tensor, input_tensor, *a, **k):
                self.add("all_gather", input_tensor, output_tensor)
                return fn(output_tensor, input_tensor, *a, **k)
            return wrapped

        def scatter(fn):
            def wrapped(output=None, input=None, *a, **k):
                self.add("reduce_scatter", input, output)
                return fn(output, input, *a, **k)
            return wrapped

        def reduce(fn):
            def wrapped(tensor, *a, **k):
                self.add("all_reduce", tensor, tensor)
                return fn(tensor, *a, **k)
            return wrapped

        kinds = {"all_gather_single": gather, "all_gather_into_tensor": gather, "reduce_scatter_single": scatter,
                 "reduce_scatter_tensor": scatter, "all_reduce": reduce}
        try:
            for name, fn in originals.items():
                setattr(dist, name, kinds[name](fn))
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)


def all_gather_bytes(shapes: list[tuple[int, int]], *, ternary: bool, param_bytes: int = 4,
                     other_numel: int = 0) -> int:
    """Bytes each rank receives from FSDP2's parameter all-gathers in one forward (whole tensors gathered).

    Args:
        shapes: ``(out, in)`` of every BitLinear weight.
        ternary: the ternary all-gather (``out * in / 4`` code bytes and one summary all-reduce of
            ``SUMMARY_BUCKETS`` int64 per weight) instead of ``param_bytes`` per value.
        param_bytes: bytes per gathered value of the plain gather (4 float32, 2 with a bf16 ``param_dtype``).
        other_numel: values of the other gathered parameters (embeddings, norms, head), always plain.
    """
    linear = sum(o * i for o, i in shapes)
    if ternary:
        return linear // 4 + len(shapes) * SUMMARY_BUCKETS * 8 + other_numel * param_bytes
    return (linear + other_numel) * param_bytes
