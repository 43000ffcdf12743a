"""Native CPU backend of ``bitdistill::packed_linear`` (beside :mod:`bitdistill.cuda_ext`; the op's default implementation).

Two integer paths, both exact (the accumulator ``X_q @ T^T`` is an exact integer):

* **native** (up to ``NATIVE_MAX_TOKENS`` tokens of at most ``NATIVE_MAX_K`` features): the library ``bitdistill._cpu`` (C sources in ``csrc/cpu/``)
  reads the packed ``uint8 [N/4, K]`` bytes directly, unpacks them in registers and multiplies them with the int8
  activation codes, int32 accumulation; each packed row is read once and reused for every token; OpenMP over rows
  for large layers, one thread below 64K packed-bytes×tokens. Its kernels are picked at run time for the CPU's
  instructions (:func:`cpu_isa`: scalar, AVX2, AVX-512 VNNI), each bit-identical to the scalar one. Activation
  quantization and the epilogue run in the same call (same float32 operations as the reference, so results are
  bit-identical). The library is built by ``pip install`` (wheel or editable) or, in a checkout,
  ``python setup.py build_ext --inplace`` (see ``setup.py``); it is loaded with ``ctypes``. Set
  ``BITDISTILL_NATIVE_CPU=0`` to disable it. Without it the tiled path is used.
* **tiled** (no library, more tokens or wider inputs): unpacks at most ``TILE_BYTES`` of float32 weight codes at a
  time and multiplies them with the float32 activation codes (MKL/oneDNN GEMM). Integer-valued
  float32 products are exact for ``K < 2**17`` (:data:`bitdistill.quant.reference.MAX_EXACT_K`).

Neither path keeps any copy of the weight besides the packed bytes.

The same library runs a whole Llama-family decoder stack for a batch of sequences (:class:`NativeDecoderStack`,
used by :class:`bitdistill.FastDecoder`) and an int8 output head (:class:`NativeInt8Head`).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bitdistill._native_hash import cpu_source_hash
from bitdistill.errors import UserError
from bitdistill.quant.reference import MAX_EXACT_K, activation_quant

__all__ = ["BUILD_HINT", "ISA_NAMES", "NATIVE_MAX_K", "NATIVE_MAX_TOKENS", "TILE_BYTES", "NativeDecoderStack", "NativeInt8Head",
           "NativeLayer", "NativeLinear", "NativeNorm", "SharedInputPackedLinears", "cpu_isa", "ctypes_layout",
           "forced_isa", "greedy_tokens", "native_available", "native_layout", "native_unavailable_reason", "packed_int_mm", "packed_linear_cpu"]

NATIVE_MAX_TOKENS = 4096
# The VNNI kernels multiply each 2-bit code plane in place (plane j is 4^j c) and shift the sums back: int32 holds
# them exactly while K * 192 * 128 < 2**31 (K < 87,382, even for the code 3 that validation refuses).
NATIVE_MAX_K = 65536
TILE_BYTES = 1 << 21
ISA_NAMES = ("scalar", "avx2", "avx512_vnni")
HEAD_BLOCK = 64  # BD_HEAD_BLOCK in csrc/cpu/bitdistill_cpu.h
BUILD_HINT = ("the native CPU library bitdistill._cpu is not built: `pip install -e .` (or, in a checkout, "
              "`python setup.py build_ext --inplace`) with a C compiler that has OpenMP (gcc)")
_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT_SOURCES = _PACKAGE.parent / "csrc" / "cpu"
_lock = threading.Lock()
_lib: ctypes.CDLL | bool | None = None  # None: not tried yet; False: unavailable
_why_unavailable = ""

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "bitdistill_packed_int_mm": ([_P, _I64, _I64, _P, _I64, _P, _I32], _I32),
    "bitdistill_linears_scratch_bytes": ([_I64, _I64], _I64),
    "bitdistill_packed_linears": ([_P, _I32, _I64, _I64, _I32, _P, _P, _P, _P, _P, _P, _P, _I32], _I32),
    "bitdistill_head_scratch_bytes": ([_I64, _I64], _I64),
    "bitdistill_head": ([_P, _P, _I64, _P, _P, _I32], _I32),
    "bitdistill_decode_scratch_bytes": ([_P, _I32], _I64),
    "bitdistill_decode": ([_P, _P, _I32, _P, _I64, _I64, _I64, _I32, _P, _P, _I32], _I32),
    "bitdistill_greedy": ([_P, _I64, _I64, _I32, _P], None),
    "bitdistill_generate": ([_P, _P, _I32, _P, _I64, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _I32], _I64),
    "bitdistill_layout": ([_P, _I64], _I64),
    "bitdistill_set_isa": ([_I32], _I32),
    "bitdistill_isa": ([], _I32),
    "bitdistill_source_hash": ([], ctypes.c_char_p),
}


def _library_path() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _PACKAGE / f"_cpu{suffix}"
        if path.is_file():
            return path
    return None


def _load() -> ctypes.CDLL | bool:
    global _why_unavailable
    if os.environ.get("BITDISTILL_NATIVE_CPU", "1") == "0":
        _why_unavailable = "BITDISTILL_NATIVE_CPU=0"
        return False
    path = _library_path()
    if path is None:
        _why_unavailable = BUILD_HINT
        return False
    lib = ctypes.CDLL(str(path))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    built = lib.bitdistill_source_hash().decode()
    if _CHECKOUT_SOURCES.is_dir() and built != cpu_source_hash(_CHECKOUT_SOURCES):
        _why_unavailable = (f"{path.name} was built from other sources than {_CHECKOUT_SOURCES} (stale build); "
                            "rebuild it: `python setup.py build_ext --inplace` or `pip install -e .`")
    elif _layout(lib) != ctypes_layout():
        _why_unavailable = f"{path.name}'s struct layouts differ from cpu_ext.py's ctypes mirrors; rebuild it"
    else:
        return lib
    warnings.warn(f"bitdistill: {_why_unavailable}; using the torch CPU path", stacklevel=3)
    return False


def native_available() -> bool:
    """Whether the native library is built and loaded (loading it on first call)."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                _lib = _load()
    return _lib is not False


def native_unavailable_reason() -> str:
    """Why :func:`native_available` is False ("" when it is True)."""
    native_available()
    return _why_unavailable


def cpu_isa() -> str:
    """The instruction set of the kernels in use: one of :data:`ISA_NAMES` (``"scalar"`` without the library)."""
    return ISA_NAMES[_lib.bitdistill_isa()] if native_available() else "scalar"


@contextlib.contextmanager
def forced_isa(name: str) -> Iterator[str]:
    """Use the kernels of ``name`` (capped at what this CPU has) inside the block; yields the one in use.
    Not thread safe: for tests and benchmarks."""
    if not native_available():
        raise RuntimeError(BUILD_HINT)
    before = _lib.bitdistill_isa()
    try:
        yield ISA_NAMES[_lib.bitdistill_set_isa(ISA_NAMES.index(name))]
    finally:
        _lib.bitdistill_set_isa(before)


def _layout(lib: ctypes.CDLL) -> list[int]:
    out = (ctypes.c_int64 * 256)()
    n = lib.bitdistill_layout(out, 256)
    return list(out[:n])


def native_layout() -> list[int]:
    """The C structs' sizes and offsets as the library reports them (see ``bitdistill_layout``)."""
    if not native_available():
        raise RuntimeError(BUILD_HINT)
    return _layout(_lib)


def ctypes_layout() -> list[int]:
    """The same list from this module's ctypes mirrors: per struct its size, then each field's offset."""
    out = []
    for struct in (_Linear, _Norm, _Head, _Layer, _Model):
        out.append(ctypes.sizeof(struct))
        out += [getattr(struct, name).offset for name, _ in struct._fields_]
    return out


def _native_int_mm(x_codes: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    m, k = x_codes.shape
    out = torch.empty((m, packed.shape[0] * 4), dtype=torch.int32)
    _lib.bitdistill_packed_int_mm(x_codes.data_ptr(), m, k, packed.data_ptr(), packed.shape[0], out.data_ptr(),
                                  torch.get_num_threads())
    return out


def _tiled_int_mm(x_codes: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``X_q @ T^T`` as float32, unpacking at most ``TILE_BYTES`` of float32 codes at a time."""
    p, k = packed.shape
    xf = x_codes.float() if k < MAX_EXACT_K else x_codes.double()
    out = torch.empty((x_codes.shape[0], 4, p), dtype=xf.dtype)
    rows = max(1, TILE_BYTES // (4 * k * xf.element_size()))
    for r0 in range(0, p, rows):
        chunk = packed[r0:r0 + rows]
        for i in range(4):
            codes = ((chunk >> (2 * i)) & 3).to(xf.dtype).sub_(1)
            torch.matmul(xf, codes.t(), out=out[:, i, r0:r0 + rows])
    return out.reshape(x_codes.shape[0], 4 * p)


def _linears_scratch(m: int, k: int) -> torch.Tensor:
    return torch.empty(_lib.bitdistill_linears_scratch_bytes(m, k), dtype=torch.uint8)


def packed_int_mm(x_codes: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Exact ``X_q @ unpack(packed)^T``.

    Args:
        x_codes: int8 ``[M, K]`` activation codes (CPU).
        packed: uint8 ``[N/4, K]`` packed ternary weight (CPU).

    Returns:
        ``[M, N]``: int32 from the native kernel, float32 (float64 for huge ``K``) from the tiled path;
        exact integers either way.
    """
    x_codes = x_codes.contiguous()
    packed = packed.contiguous()
    if x_codes.shape[0] <= NATIVE_MAX_TOKENS and x_codes.shape[1] <= NATIVE_MAX_K and native_available():
        return _native_int_mm(x_codes, packed)
    return _tiled_int_mm(x_codes, packed)


def packed_linear_cpu(
    x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``(X_q @ T^T) / (s_x * weight_scale) + bias`` for 2-D ``x [M, K]`` -> ``[M, N]`` in ``x``'s dtype.

    Same math, operation order and result as :func:`bitdistill.quant.packing.packed_linear_reference`
    (activation quantization and the epilogue in float32, the product exact).
    """
    if x.shape[0] <= NATIVE_MAX_TOKENS and x.shape[1] <= NATIVE_MAX_K and native_available():
        return SharedInputPackedLinears([(packed, weight_scale, bias)])(x)[0]
    x_codes, x_scale = activation_quant(x)
    acc = packed_int_mm(x_codes, packed).float()
    y = acc.div_(x_scale * weight_scale.float().reshape(-1))
    if bias is not None:
        y = y.add_(bias.float())
    return y.to(x.dtype)


class SharedInputPackedLinears:
    """Packed linears that share one input (q/k/v, gate/up), computed by one native call.

    ``y_i = packed_linear_cpu(x, packed_i, weight_scale_i, bias_i)`` for every ``i``, bit for bit, but the
    input is quantized once, bfloat16 is read and written by the kernel (no float32 copies) and the call
    costs one ``ctypes`` crossing. Built once per group; the tensors are referenced, not copied (biases
    are kept as float32). Without the native library each output comes from :func:`packed_linear_cpu`.

    Args:
        weights: ``(packed uint8 [N_i / 4, K], weight_scale [1] or [N_i] (per row), bias [N_i] or None)`` per
            linear (at most 8), all with the same ``K``.
    """

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> None:
        if not weights or len(weights) > 8 or len({p.shape[1] for p, _, _ in weights}) != 1:
            raise ValueError("SharedInputPackedLinears needs 1 to 8 packed weights with the same in_features")
        self.weights = weights
        self.in_features = weights[0][0].shape[1]
        self.out_features = [p.shape[0] * 4 for p, _, _ in weights]
        self._packed = [p.contiguous() for p, _, _ in weights]
        self._bias = [None if b is None else b.detach().float().contiguous() for _, _, b in weights]
        self._row_scale = [_row_scale(s) for _, s, _ in weights]
        n = len(weights)
        self._args = (
            (ctypes.c_void_p * n)(*[p.data_ptr() for p in self._packed]),
            (ctypes.c_int64 * n)(*[p.shape[0] for p in self._packed]),
            (ctypes.c_float * n)(*[float(s.reshape(-1)[0]) for _, s, _ in weights]),
            (ctypes.c_void_p * n)(*[None if r is None else r.data_ptr() for r in self._row_scale]),
            (ctypes.c_void_p * n)(*[None if b is None else b.data_ptr() for b in self._bias]),
        )

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x [M, K]`` (CPU float32 or bfloat16) -> ``[y_1 [M, N_1], ...]`` in ``x``'s dtype."""
        m = x.shape[0]
        if (x.dtype not in (torch.float32, torch.bfloat16) or m > NATIVE_MAX_TOKENS or self.in_features > NATIVE_MAX_K
                or not native_available()):
            return [packed_linear_cpu(x, p, s, b) for p, s, b in self.weights]
        x = x.detach().contiguous()
        outs = [torch.empty((m, n), dtype=x.dtype) for n in self.out_features]
        ptrs = (ctypes.c_void_p * len(outs))(*[o.data_ptr() for o in outs])
        scratch = _linears_scratch(m, self.in_features)
        _lib.bitdistill_packed_linears(x.data_ptr(), int(x.dtype == torch.bfloat16), m, self.in_features, len(outs),
                                       *self._args, ptrs, scratch.data_ptr(), torch.get_num_threads())
        return outs


def _row_scale(weight_scale: torch.Tensor) -> torch.Tensor | None:
    """A layer's per-row weight scales as contiguous float32 ``[N]`` for the C ``row_scale``; None for one per tensor."""
    return None if weight_scale.numel() == 1 else weight_scale.detach().float().reshape(-1).contiguous()


class _Linear(ctypes.Structure):
    _fields_ = [("packed", ctypes.c_void_p), ("P", ctypes.c_int64), ("scale", ctypes.c_float),
                ("bias", ctypes.c_void_p), ("row_scale", ctypes.c_void_p)]


class _Norm(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("eps", ctypes.c_float)]


class _Head(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("V", ctypes.c_int64), ("K", ctypes.c_int64),
                ("Kp", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [*[(n, _Norm) for n in ("input_norm", "post_norm", "q_norm", "k_norm", "attn_sub_norm",
                                       "ffn_sub_norm")],
                ("qkv", _Linear * 3), ("n_qkv", ctypes.c_int32), ("o", _Linear), ("mlp_in", _Linear * 2),
                ("n_mlp_in", ctypes.c_int32), ("down", _Linear), ("k_cache", ctypes.c_void_p),
                ("v_cache", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [*[(n, ctypes.c_int64) for n in ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "intermediate",
                                               "rot", "max_len", "max_batch", "max_chunk")],
                ("scaling", ctypes.c_float), ("bf16", ctypes.c_int32), ("act", ctypes.c_int32),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("final_norm", _Norm),
                ("layers", ctypes.POINTER(_Layer)), ("head", _Head)]


class NativeInt8Head:
    """An output head with int8 weights (per-row absmax scale; approximate): half the bytes of a bfloat16 head.

    The input is quantized to int8 in blocks of 64 features, each with its own scale (as llama.cpp's ``Q8_0``
    activations, with wider blocks), and multiplied with the int8 rows by the library's integer kernels; without
    the library, the same weights run through ``torch._weight_int8pack_mm`` with float inputs.

    Args:
        weight: ``[V, K]`` float head weight (``lm_head.weight``).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.detach().float()
        self.vocab, self.in_features = w.shape
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        codes = torch.round(w / scale[:, None]).to(torch.int8)
        self.padded = -(-self.in_features // HEAD_BLOCK) * HEAD_BLOCK
        self.weight = torch.nn.functional.pad(codes, (0, self.padded - self.in_features)).contiguous()
        self.scale = scale.contiguous()
        self.struct = _Head(self.weight.data_ptr(), self.scale.data_ptr(), self.vocab, self.in_features, self.padded)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` -> float32 logits ``[..., V]``."""
        x2d = x.detach().reshape(-1, self.in_features).float().contiguous()
        if not native_available():
            codes = self.weight[:, :self.in_features].contiguous()
            return torch._weight_int8pack_mm(x2d, codes, self.scale).reshape(*x.shape[:-1], self.vocab)
        m = x2d.shape[0]
        out = torch.empty((m, self.vocab), dtype=torch.float32)
        scratch = torch.empty(_lib.bitdistill_head_scratch_bytes(m, self.padded), dtype=torch.uint8)
        _lib.bitdistill_head(ctypes.byref(self.struct), x2d.data_ptr(), m, out.data_ptr(), scratch.data_ptr(),
                             torch.get_num_threads())
        return out.reshape(*x.shape[:-1], self.vocab)


@dataclass(frozen=True)
class NativeLinear:
    """One packed BitLinear: ``packed`` uint8 ``[N / 4, K]``, ``weight_scale`` ``[1]`` (or ``[N]``, one per output
    row), ``bias`` ``[N]`` or None."""

    packed: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class NativeNorm:
    """A LlamaRMSNorm: ``weight [n]`` in the model dtype and its ``eps``."""

    weight: torch.Tensor
    eps: float


@dataclass(frozen=True)
class NativeLayer:
    """One Llama-family decoder layer for :class:`NativeDecoderStack`.

    ``qkv``: q, k, v projections, or one fused ``[q; k; v]`` projection; ``mlp_in``: gate and up, or one fused
    ``[gate; up]``. ``q_norm``/``k_norm`` (per head, Qwen3) and ``attn_sub_norm``/``ffn_sub_norm`` (before
    ``o_proj``/``down_proj``, BitNet) are optional.
    """

    input_norm: NativeNorm
    post_norm: NativeNorm
    qkv: tuple[NativeLinear, ...]
    o: NativeLinear
    mlp_in: tuple[NativeLinear, ...]
    down: NativeLinear
    q_norm: NativeNorm | None = None
    k_norm: NativeNorm | None = None
    attn_sub_norm: NativeNorm | None = None
    ffn_sub_norm: NativeNorm | None = None


ACTIVATIONS = ("silu", "relu2")


def greedy_tokens(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The native greedy choice over float32 ``logits [B, V]``: ``[B]`` int64, ``argmax(logits.to(dtype))`` as torch
    takes it (the first of equal maxima; the first NaN where a row has one), for ``dtype`` float32 or bfloat16."""
    if not native_available():
        raise UserError(f"the native CPU stack is not available: {_why_unavailable}")
    if logits.dim() != 2 or logits.dtype != torch.float32 or dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"greedy_tokens: logits must be [B, V] float32 and dtype float32 or bfloat16, got "
                         f"{tuple(logits.shape)} {logits.dtype} and {dtype}")
    x = logits.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _lib.bitdistill_greedy(x.data_ptr(), x.shape[0], x.shape[1], int(dtype == torch.bfloat16), out.data_ptr())
    return out


class NativeDecoderStack:
    """A Llama-family decoder stack (every layer, the final norm, optionally an int8 head) in one native call per
    step, for up to ``max_batch`` sequences decoded together.

    Each call runs ``T`` new tokens of each sequence at positions ``pos..pos+T-1`` through every layer (in chunks
    of at most ``max_chunk`` tokens per sequence: a prompt runs as GEMMs), writes their keys and values into this
    object's static cache (``[max_batch, n_kv, max_length, head_dim]`` per layer, in the model dtype) and returns
    the final norm of the last (or every) token's hidden state, and the head's logits when it has one. The math
    is the eager model's, in float32, rounded to the model dtype wherever torch rounds (see ``csrc/cpu/decoder.c``);
    the projections are exact, while reductions (RMSNorm, attention) differ from torch's kernels in summation
    order, i.e. in the last float32 bits before rounding. The weight tensors are referenced, not copied. Its
    scratch is allocated once, here: a call allocates only the tensors it returns.

    Args:
        layers: the decoder layers, in order.
        final_norm: the norm after the last layer.
        n_heads, n_kv, head_dim: attention heads, key/value heads (grouped-query when fewer) and head size.
        scaling: the attention score scale (``head_dim ** -0.5`` for Llama).
        act: the MLP activation, one of :data:`ACTIVATIONS` (SiLU, or ReLU squared for BitNet).
        cos, sin: ``[max_length, rot]`` rotary tables in the model dtype (``rot <= head_dim``: partial rotary).
        dtype: float32 or bfloat16, the dtype of every norm weight, table and hidden state.
        head: an int8 head run inside the call, or None (the caller applies its own to the returned states).
        max_batch: the most sequences one call holds.
        max_chunk: the most tokens per sequence one pass through the layers holds (default ``min(max_length, 64)``).
        threads: the most threads a call uses (default ``torch.get_num_threads()``); each call uses
            ``min(threads, torch.get_num_threads())``.
    """

    def __init__(self, layers: list[NativeLayer], *, final_norm: NativeNorm, n_heads: int, n_kv: int, head_dim: int,
                 scaling: float, act: str, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype,
                 head: NativeInt8Head | None = None, max_batch: int = 1, max_chunk: int | None = None,
                 threads: int | None = None) -> None:
        if not native_available():
            raise UserError(f"the native CPU stack is not available: {_why_unavailable}")
        if dtype not in (torch.float32, torch.bfloat16) or act not in ACTIVATIONS or n_heads % n_kv:
            raise ValueError(f"NativeDecoderStack: unsupported dtype {dtype}, act {act!r} or heads {n_heads}/{n_kv}")
        self.dtype = dtype
        self.max_length, rot = cos.shape
        self.max_batch = max_batch
        self.hidden = final_norm.weight.shape[0]
        self.head = head
        self.threads = threads or torch.get_num_threads()
        self._keep: list[torch.Tensor] = []  # every tensor whose address the C structs hold
        shape = (max_batch, n_kv, self.max_length, head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype) for _ in layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype) for _ in layers]
        self._layers = (_Layer * len(layers))(*[self._layer(layer, k, v) for layer, k, v in
                                                 zip(layers, self.k_cache, self.v_cache, strict=True)])
        self._model = _Model(n_layers=len(layers), hidden=self.hidden, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim,
                             intermediate=layers[0].down.packed.shape[1], rot=rot, max_len=self.max_length,
                             max_batch=max_batch, max_chunk=max_chunk or min(self.max_length, 64),
                             scaling=scaling, bf16=int(dtype == torch.bfloat16), act=ACTIVATIONS.index(act),
                             cos=self._ptr(cos), sin=self._ptr(sin), final_norm=self._norm(final_norm),
                             layers=self._layers, head=head.struct if head is not None else _Head())
        self._scratch = torch.empty(_lib.bitdistill_decode_scratch_bytes(ctypes.byref(self._model), self.threads),
                                    dtype=torch.uint8)

    def _ptr(self, t: torch.Tensor | None, dtype: torch.dtype | None = None) -> int | None:
        if t is None:
            return None
        t = t.detach().to(dtype or self.dtype).contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _norm(self, norm: NativeNorm | None) -> _Norm:
        return _Norm() if norm is None else _Norm(self._ptr(norm.weight), norm.eps)

    def _linear(self, lin: NativeLinear) -> _Linear:
        return _Linear(self._ptr(lin.packed, torch.uint8), lin.packed.shape[0], float(lin.weight_scale.reshape(-1)[0]),
                       self._ptr(lin.bias, torch.float32), self._ptr(_row_scale(lin.weight_scale), torch.float32))

    def _layer(self, layer: NativeLayer, k_cache: torch.Tensor, v_cache: torch.Tensor) -> _Layer:
        return _Layer(*[self._norm(getattr(layer, n)) for n in ("input_norm", "post_norm", "q_norm", "k_norm",
                                                               "attn_sub_norm", "ffn_sub_norm")],
                      (_Linear * 3)(*[self._linear(lin) for lin in layer.qkv]), len(layer.qkv), self._linear(layer.o),
                      (_Linear * 2)(*[self._linear(lin) for lin in layer.mlp_in]), len(layer.mlp_in),
                      self._linear(layer.down), k_cache.data_ptr(), v_cache.data_ptr())

    def forward(self, h: torch.Tensor, pos: int, *, all_positions: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``h [B, T, hidden]`` (the embedded new tokens of B sequences) at positions ``pos..pos+T-1`` ->
        (final-normed states, logits): ``[B, hidden]`` and ``[B, V]`` float32 for the last token, or ``[B, T, ...]``
        for every token with ``all_positions``; logits None without a head."""
        if h.dim() != 3 or h.shape[2] != self.hidden:
            raise ValueError(f"NativeDecoderStack: h must be [batch, tokens, {self.hidden}], got {tuple(h.shape)}")
        b, t = h.shape[:2]
        if not 1 <= b <= self.max_batch:
            raise UserError(f"batch {b} exceeds this decoder's max_batch {self.max_batch}; build it with a larger "
                            "max_batch")
        if t == 0 or not 0 <= pos <= pos + t <= self.max_length:
            raise UserError(f"{t} tokens at position {pos} exceed this decoder's max_length {self.max_length}; build "
                            "it with a larger max_length")
        h = h.detach().to(self.dtype).contiguous()
        rows = (b, t) if all_positions else (b,)
        out = torch.empty((*rows, self.hidden), dtype=self.dtype)
        logits = None if self.head is None else torch.empty((*rows, self.head.vocab), dtype=torch.float32)
        status = _lib.bitdistill_decode(ctypes.byref(self._model), self._scratch.data_ptr(), self.threads,
                                        h.data_ptr(), b, t, pos, int(all_positions), out.data_ptr(),
                                        None if logits is None else logits.data_ptr(), torch.get_num_threads())
        if status:
            raise RuntimeError(f"bitdistill_decode refused batch {b}, {t} tokens at {pos} (status {status})")
        return out, logits

    def generate(self, embed: torch.Tensor, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation in one native call (no return to Python between tokens; needs the int8 head):
        ``input_ids [B, T]`` (int64, B prompts of one length from position 0) are embedded from ``embed
        [n_embed, hidden]`` (the model's input embedding in its dtype) and decoded; each step's token is the greedy
        choice over the logits rounded to the model dtype (:func:`greedy_tokens`). With ``eos_token_id``, a sequence
        that has produced it is continued with it and generation stops once every sequence has. Returns the new
        tokens ``[B, n]``, ``n <= max_new_tokens``."""
        if self.head is None:
            raise ValueError("NativeDecoderStack.generate needs the native int8 head")
        if embed.dtype != self.dtype or embed.dim() != 2 or embed.shape[1] != self.hidden:
            raise ValueError(f"NativeDecoderStack.generate: embed must be [n, {self.hidden}] {self.dtype}, got "
                             f"{tuple(embed.shape)} {embed.dtype}")
        b, t = input_ids.shape
        if not 1 <= b <= self.max_batch or t < 1 or max_new_tokens < 0 or t + max_new_tokens > self.max_length:
            raise UserError(f"{b} prompts of {t} tokens + {max_new_tokens} new exceed this decoder's max_batch "
                            f"{self.max_batch} or max_length {self.max_length}")
        embed, ids = embed.detach().contiguous(), input_ids.to(torch.int64).contiguous()
        tokens = torch.empty((b, max_new_tokens), dtype=torch.int64)
        h = torch.empty((b, t, self.hidden), dtype=self.dtype)
        out = torch.empty((b, self.hidden), dtype=self.dtype)
        logits = torch.empty((b, self.head.vocab), dtype=torch.float32)
        n = _lib.bitdistill_generate(ctypes.byref(self._model), self._scratch.data_ptr(), self.threads,
                                     embed.data_ptr(), embed.shape[0], ids.data_ptr(), b, t, max_new_tokens,
                                     -1 if eos_token_id is None else eos_token_id, tokens.data_ptr(), h.data_ptr(),
                                     out.data_ptr(), logits.data_ptr(), torch.get_num_threads())
        if n == -2:
            raise UserError(f"a token id is outside the embedding's 0..{embed.shape[0] - 1}")
        if n < 0:
            raise RuntimeError(f"bitdistill_generate refused {b} prompts of {t} tokens + {max_new_tokens} (status {n})")
        return tokens[:, :n]

    def __call__(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        """``h [T, hidden]`` (one sequence's embedded new tokens) at positions ``pos..pos+T-1`` -> the final norm
        of the last token's state, ``[hidden]``."""
        if h.dim() != 2:
            raise ValueError(f"NativeDecoderStack: h must be [tokens, {self.hidden}], got {tuple(h.shape)}")
        return self.forward(h[None], pos)[0][0]
