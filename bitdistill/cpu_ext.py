"""Native CPU backend of ``bitdistill::packed_linear`` (beside :mod:`bitdistill.cuda_ext`; the op's default implementation).

Two integer paths, both exact (the accumulator ``X_q @ T^T`` is an exact integer):

* **native** (up to ``NATIVE_MAX_TOKENS`` tokens): a small C kernel (``packed_cpu.c``) reads the packed
  ``uint8 [N/4, K]`` bytes directly, unpacks them in AVX2 registers and multiplies them with the int8
  activation codes (``vpmaddubsw``), int32 accumulation; each packed row is read once and reused for
  every token; OpenMP over rows for large layers, one thread below 4M packed-bytes×tokens. Activation quantization
  and the epilogue run in the same call (same float32 operations as the reference, so results are
  bit-identical). It allocates no weight-sized memory. It is compiled with the system C compiler on first use into
  ``$BITDISTILL_CACHE`` (default ``~/.cache/bitdistill``) and loaded with ``ctypes``; set
  ``BITDISTILL_NATIVE_CPU=0`` to disable it. Without a compiler the tiled path is used.
* **tiled** (no compiler, or more tokens): unpacks at most ``TILE_BYTES`` of float32 weight codes at a
  time and multiplies them with the float32 activation codes (MKL/oneDNN GEMM). Integer-valued
  float32 products are exact for ``K < 2**17`` (:data:`bitdistill.quant.reference.MAX_EXACT_K`).

Neither path keeps any copy of the weight besides the packed bytes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

from bitdistill.errors import UserError
from bitdistill.io import atomic_write
from bitdistill.quant.reference import MAX_EXACT_K, activation_quant

__all__ = ["NATIVE_MAX_TOKENS", "TILE_BYTES", "SharedInputPackedLinears", "native_available", "packed_int_mm",
           "packed_linear_cpu"]

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
