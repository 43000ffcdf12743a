"""Native CPU backend of ``bitdistill::packed_linear`` (beside :mod:`bitdistill.cuda_ext`; the op's default implementation).

Two integer paths, both exact (the accumulator ``X_q @ T^T`` is an exact integer):

* **native** (up to ``NATIVE_MAX_TOKENS`` tokens): a small C kernel (``packed_cpu.c``) reads the packed
  ``uint8 [N/4, K]`` bytes directly, unpacks them in AVX2 registers and multiplies them with the int8
  activation codes (``vpmaddubsw``), int32 accumulation; each packed row is read once and reused for
  every token; OpenMP over rows for large layers, one thread below 64K packed-bytes×tokens. Activation quantization
  and the epilogue run in the same call (same float32 operations as the reference, so results are
  bit-identical). It allocates no weight-sized memory. It is compiled with the system C compiler on first use into
  ``$BITDISTILL_CACHE`` (default ``~/.cache/bitdistill``) and loaded with ``ctypes``; set
  ``BITDISTILL_NATIVE_CPU=0`` to disable it. Without a compiler the tiled path is used.
* **tiled** (no compiler, or more tokens): unpacks at most ``TILE_BYTES`` of float32 weight codes at a
  time and multiplies them with the float32 activation codes (MKL/oneDNN GEMM). Integer-valued
  float32 products are exact for ``K < 2**17`` (:data:`bitdistill.quant.reference.MAX_EXACT_K`).

Neither path keeps any copy of the weight besides the packed bytes.

The same C file runs a whole Llama-family decoder stack per call for batch-1 decoding
(:class:`NativeDecoderStack`, used by :class:`bitdistill.FastDecoder`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from bitdistill.errors import UserError
from bitdistill.io import atomic_write
from bitdistill.quant.reference import MAX_EXACT_K, activation_quant

__all__ = ["NATIVE_MAX_TOKENS", "TILE_BYTES", "NativeDecoderStack", "NativeLayer", "NativeLinear", "NativeNorm",
           "SharedInputPackedLinears", "native_available", "packed_int_mm", "packed_linear_cpu"]

NATIVE_MAX_TOKENS = 4096
TILE_BYTES = 1 << 21
_SOURCE = Path(__file__).with_name("packed_cpu.c")
_lock = threading.Lock()
_lib: ctypes.CDLL | bool | None = None  # None: not tried yet; False: unavailable


def _compile_flags() -> list[str]:
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _build() -> ctypes.CDLL | bool:
    if os.environ.get("BITDISTILL_NATIVE_CPU", "1") == "0":
        return False
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return False
    flags = _compile_flags()
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("BITDISTILL_CACHE", Path.home() / ".cache" / "bitdistill"))
    lib_path = cache / f"packed_cpu-{key}.so"
    try:
        if not lib_path.is_file():
            atomic_write(lib_path, lambda tmp: subprocess.run([cc, *flags, str(_SOURCE), "-o", str(tmp)], check=True,
                                                              capture_output=True, timeout=120))
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, UserError, subprocess.SubprocessError) as exc:
        warnings.warn(f"bitdistill: could not build the native packed CPU kernel ({exc}); using the slower "
                      "tiled torch path", stacklevel=3)
        return False
    fn = lib.bitdistill_packed_int_mm
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.bitdistill_packed_linear_f32
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.bitdistill_packed_linears
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.bitdistill_decode
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def native_available() -> bool:
    """Whether the native kernel is built (building it on first call)."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                _lib = _build()
    return _lib is not False


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
    if x_codes.shape[0] <= NATIVE_MAX_TOKENS and native_available():
        return _native_int_mm(x_codes, packed)
    return _tiled_int_mm(x_codes, packed)


def packed_linear_cpu(
    x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``(X_q @ T^T) / (s_x * weight_scale) + bias`` for 2-D ``x [M, K]`` -> ``[M, N]`` in ``x``'s dtype.

    Same math, operation order and result as :func:`bitdistill.quant.packing.packed_linear_reference`
    (activation quantization and the epilogue in float32, the product exact).
    """
    if x.shape[0] <= NATIVE_MAX_TOKENS and native_available():
        xf = x.detach().float().contiguous()
        packed = packed.contiguous()
        bf = None if bias is None else bias.detach().float().contiguous()
        out = torch.empty((x.shape[0], packed.shape[0] * 4), dtype=torch.float32)
        status = _lib.bitdistill_packed_linear_f32(
            xf.data_ptr(), xf.shape[0], xf.shape[1], packed.data_ptr(), packed.shape[0],
            float(weight_scale.reshape(())), None if bf is None else bf.data_ptr(), out.data_ptr(),
            torch.get_num_threads())
        if status != 0:
            raise MemoryError("bitdistill native packed kernel could not allocate its scratch buffers")
        return out.to(x.dtype)
    x_codes, x_scale = activation_quant(x)
    acc = packed_int_mm(x_codes, packed).float()
    y = acc.div_(x_scale * weight_scale.float().reshape(()))
    if bias is not None:
        y = y.add_(bias.float())
    return y.to(x.dtype)


class SharedInputPackedLinears:
    """Packed linears that share one input (q/k/v, gate/up), computed by one native call.

    ``y_i = packed_linear_cpu(x, packed_i, weight_scale_i, bias_i)`` for every ``i``, bit for bit, but the
    input is quantized once, bfloat16 is read and written by the kernel (no float32 copies) and the call
    costs one ``ctypes`` crossing. Built once per group; the tensors are referenced, not copied (biases
    are kept as float32). Without the native kernel each output comes from :func:`packed_linear_cpu`.

    Args:
        weights: ``(packed uint8 [N_i / 4, K], weight_scale [1], bias [N_i] or None)`` per linear, all with
            the same ``K``.
    """

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> None:
        if not weights or len({p.shape[1] for p, _, _ in weights}) != 1:
            raise ValueError("SharedInputPackedLinears needs one or more packed weights with the same in_features")
        self.weights = weights
        self.in_features = weights[0][0].shape[1]
        self.out_features = [p.shape[0] * 4 for p, _, _ in weights]
        self._packed = [p.contiguous() for p, _, _ in weights]
        self._bias = [None if b is None else b.detach().float().contiguous() for _, _, b in weights]
        n = len(weights)
        self._args = (
            (ctypes.c_void_p * n)(*[p.data_ptr() for p in self._packed]),
            (ctypes.c_int64 * n)(*[p.shape[0] for p in self._packed]),
            (ctypes.c_float * n)(*[float(s.reshape(())) for _, s, _ in weights]),
            (ctypes.c_void_p * n)(*[None if b is None else b.data_ptr() for b in self._bias]),
        )

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x [M, K]`` (CPU float32 or bfloat16) -> ``[y_1 [M, N_1], ...]`` in ``x``'s dtype."""
        m = x.shape[0]
        if x.dtype not in (torch.float32, torch.bfloat16) or m > NATIVE_MAX_TOKENS or not native_available():
            return [packed_linear_cpu(x, p, s, b) for p, s, b in self.weights]
        x = x.detach().contiguous()
        outs = [torch.empty((m, n), dtype=x.dtype) for n in self.out_features]
        ptrs = (ctypes.c_void_p * len(outs))(*[o.data_ptr() for o in outs])
        status = _lib.bitdistill_packed_linears(x.data_ptr(), int(x.dtype == torch.bfloat16), m, self.in_features,
                                                len(outs), *self._args, ptrs, torch.get_num_threads())
        if status != 0:
            raise MemoryError("bitdistill native packed kernel could not allocate its scratch buffers")
        return outs


@dataclass(frozen=True)
class NativeLinear:
    """One packed BitLinear: ``packed`` uint8 ``[N / 4, K]``, ``weight_scale`` ``[1]``, ``bias`` ``[N]`` or None."""

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


class _Linear(ctypes.Structure):
    _fields_ = [("packed", ctypes.c_void_p), ("P", ctypes.c_int64), ("scale", ctypes.c_float),
                ("bias", ctypes.c_void_p)]


class _Norm(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("eps", ctypes.c_float)]


class _Layer(ctypes.Structure):
    _fields_ = [*[(n, _Norm) for n in ("input_norm", "post_norm", "q_norm", "k_norm", "attn_sub_norm",
                                       "ffn_sub_norm")],
                ("qkv", _Linear * 3), ("n_qkv", ctypes.c_int32), ("o", _Linear), ("mlp_in", _Linear * 2),
                ("n_mlp_in", ctypes.c_int32), ("down", _Linear), ("k_cache", ctypes.c_void_p),
                ("v_cache", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [*[(n, ctypes.c_int64) for n in ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "intermediate",
                                               "rot", "max_len")],
                ("scaling", ctypes.c_float), ("bf16", ctypes.c_int32), ("act", ctypes.c_int32),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("final_norm", _Norm),
                ("layers", ctypes.POINTER(_Layer))]


ACTIVATIONS = ("silu", "relu2")


class NativeDecoderStack:
    """A Llama-family decoder stack (every layer plus the final norm) in one native call per step, batch 1.

    Each call runs ``T`` new tokens at positions ``pos..pos+T-1`` through every layer, writes their keys and
    values into this object's static cache (``[n_kv, max_length, head_dim]`` per layer, in the model dtype)
    and returns the final norm of the last token's hidden state. The math is the eager model's, in float32,
    rounded to the model dtype wherever torch rounds (see ``bitdistill_decode`` in ``packed_cpu.c``); the
    projections are exact, while reductions (RMSNorm, attention) differ from torch's kernels in summation
    order, i.e. in the last float32 bits before rounding. The tensors are referenced, not copied.

    Args:
        layers: the decoder layers, in order.
        final_norm: the norm after the last layer.
        n_heads, n_kv, head_dim: attention heads, key/value heads (grouped-query when fewer) and head size.
        scaling: the attention score scale (``head_dim ** -0.5`` for Llama).
        act: the MLP activation, one of :data:`ACTIVATIONS` (SiLU, or ReLU squared for BitNet).
        cos, sin: ``[max_length, rot]`` rotary tables in the model dtype (``rot <= head_dim``: partial rotary).
        dtype: float32 or bfloat16, the dtype of every norm weight, table and hidden state.
    """

    def __init__(self, layers: list[NativeLayer], *, final_norm: NativeNorm, n_heads: int, n_kv: int, head_dim: int,
                 scaling: float, act: str, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> None:
        if not native_available():
            raise UserError("the native CPU kernel is not available (no C compiler, or BITDISTILL_NATIVE_CPU=0); "
                            "install gcc or decode without the native stack")
        if dtype not in (torch.float32, torch.bfloat16) or act not in ACTIVATIONS or n_heads % n_kv:
            raise ValueError(f"NativeDecoderStack: unsupported dtype {dtype}, act {act!r} or heads {n_heads}/{n_kv}")
        self.dtype = dtype
        self.max_length, rot = cos.shape
        self.hidden = final_norm.weight.shape[0]
        self._keep: list[torch.Tensor] = []  # every tensor whose address the C structs hold
        self.k_cache = [torch.zeros(n_kv, self.max_length, head_dim, dtype=dtype) for _ in layers]
        self.v_cache = [torch.zeros(n_kv, self.max_length, head_dim, dtype=dtype) for _ in layers]
        self._layers = (_Layer * len(layers))(*[self._layer(layer, k, v) for layer, k, v in
                                                 zip(layers, self.k_cache, self.v_cache, strict=True)])
        self._model = _Model(n_layers=len(layers), hidden=self.hidden, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim,
                             intermediate=layers[0].down.packed.shape[1], rot=rot, max_len=self.max_length,
                             scaling=scaling, bf16=int(dtype == torch.bfloat16), act=ACTIVATIONS.index(act),
                             cos=self._ptr(cos), sin=self._ptr(sin), final_norm=self._norm(final_norm),
                             layers=self._layers)

    def _ptr(self, t: torch.Tensor | None, dtype: torch.dtype | None = None) -> int | None:
        if t is None:
            return None
        t = t.detach().to(dtype or self.dtype).contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _norm(self, norm: NativeNorm | None) -> _Norm:
        return _Norm() if norm is None else _Norm(self._ptr(norm.weight), norm.eps)

    def _linear(self, lin: NativeLinear) -> _Linear:
        return _Linear(self._ptr(lin.packed, torch.uint8), lin.packed.shape[0], float(lin.weight_scale.reshape(())),
                       self._ptr(lin.bias, torch.float32))

    def _layer(self, layer: NativeLayer, k_cache: torch.Tensor, v_cache: torch.Tensor) -> _Layer:
        return _Layer(*[self._norm(getattr(layer, n)) for n in ("input_norm", "post_norm", "q_norm", "k_norm",
                                                               "attn_sub_norm", "ffn_sub_norm")],
                      (_Linear * 3)(*[self._linear(lin) for lin in layer.qkv]), len(layer.qkv), self._linear(layer.o),
                      (_Linear * 2)(*[self._linear(lin) for lin in layer.mlp_in]), len(layer.mlp_in),
                      self._linear(layer.down), k_cache.data_ptr(), v_cache.data_ptr())

    def __call__(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        """``h [T, hidden]`` (the embedded new tokens) at positions ``pos..pos+T-1`` -> ``[hidden]``."""
        t = h.shape[0]
        if h.dim() != 2 or h.shape[1] != self.hidden or not 0 <= pos <= pos + t <= self.max_length or t == 0:
            raise ValueError(f"NativeDecoderStack: h {tuple(h.shape)} at position {pos} does not fit hidden "
                             f"{self.hidden}, max_length {self.max_length}")
        h = h.detach().to(self.dtype).contiguous()
        out = torch.empty(self.hidden, dtype=self.dtype)
        if _lib.bitdistill_decode(ctypes.byref(self._model), h.data_ptr(), t, pos, out.data_ptr(),
                                  torch.get_num_threads()):
            raise MemoryError("bitdistill native decoder could not allocate its scratch buffers")
        return out
