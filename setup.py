"""Builds bitdistill's native code; all metadata is in pyproject.toml.

One build path for wheels, ``pip install -e .`` and a checkout (``python setup.py build_ext --inplace``) alike:

* ``bitdistill._cpu``: the native CPU library from ``csrc/cpu/`` (packed ternary GEMV/GEMM, int8 head, decoder
  stack), a plain shared library loaded with ``ctypes`` by ``bitdistill/cpu_ext.py``. It is compiled for the
  baseline x86-64 instruction set; its AVX2 and AVX-512 VNNI kernels are compiled alongside and picked at run time
  for the CPU's instructions, so one build runs on every x86-64 machine. Built wherever a C compiler with OpenMP
  is found; without one the package installs without it and the CPU path uses torch. ``-ffp-contract=off``: no
  fused multiply-adds where the C code rounds each product as torch does. ``BITDISTILL_BUILD_CPU=0``
  skips it.
* ``bitdistill._C``: the optional CUDA extension from ``csrc/*.cu``, built only when torch is a CUDA build and a
  CUDA toolkit (``nvcc``) is found. ``BITDISTILL_BUILD_CUDA=0`` skips it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CPU_SOURCES = sorted(Path("csrc/cpu").glob("*.c"))


def _cpu_source_hash() -> str:
    spec = importlib.util.spec_from_file_location("_native_hash", Path("bitdistill") / "_native_hash.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cpu_source_hash(Path("csrc") / "cpu")


def _cpu_extensions() -> list[Extension]:
    if not CPU_SOURCES or os.environ.get("BITDISTILL_BUILD_CPU", "1") == "0":
        return []
    return [Extension("bitdistill._cpu", [str(p) for p in CPU_SOURCES], include_dirs=["csrc/cpu"],
                      depends=[str(p) for p in sorted(Path("csrc/cpu").glob("*.h"))],
                      define_macros=[("BD_SOURCE_HASH", f'"{_cpu_source_hash()}"')],
                      extra_compile_args=["-O3", "-fopenmp", "-std=gnu11", "-ffp-contract=off"], extra_link_args=["-fopenmp"])]


def _cuda_extensions():
    sources = sorted(str(p) for p in Path("csrc").glob("*.cu")) + sorted(str(p) for p in Path("csrc").glob("*.cpp"))
    if not sources or os.environ.get("BITDISTILL_BUILD_CUDA", "1") == "0":
        return [], None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], None
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], None
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        # No GPU to detect: build for Ampere and Hopper (the kernel needs compute capability >= 8.0).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    ext = CUDAExtension(
        "bitdistill._C",
        sources,
        # No --use_fast_math: the epilogue must use IEEE division to match the reference bit for bit.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [ext], BuildExtension


cuda_ext_modules, cuda_builder = _cuda_extensions()


class _BuildExt(cuda_builder or build_ext):
    """Builds both libraries (torch's builder where the CUDA extension is built), and lets a failed CPU build (no
    compiler, no OpenMP) leave the package without it instead of failing the install."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != "bitdistill._cpu":
            super().build_extension(ext)
            return
        try:
            super().build_extension(ext)
        except Exception as exc:  # a missing compiler surfaces as several distutils error types
            print(f"bitdistill: the native CPU library was not built ({exc}); the CPU path will use torch")


setup(ext_modules=_cpu_extensions() + cuda_ext_modules, cmdclass={"build_ext": _BuildExt})
