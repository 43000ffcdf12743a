"""Only for the optional CUDA extension ``bitdistill._C`` built from ``csrc/``; all metadata is in pyproject.toml.

The extension is built only when ``csrc/`` has sources, torch is a CUDA build and a CUDA toolkit
(``nvcc``) is found; otherwise nothing is compiled and the package installs without it. Set
``BITDISTILL_BUILD_CUDA=0`` to skip the build even where it is possible.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup


def _cuda_extensions():
    sources = sorted(str(p) for p in Path("csrc").glob("*.cu")) + sorted(str(p) for p in Path("csrc").glob("*.cpp"))
    if not sources or os.environ.get("BITDISTILL_BUILD_CUDA", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        # No GPU to detect: build for Ampere and Hopper (the kernel needs compute capability >= 8.0).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    ext = CUDAExtension(
        "bitdistill._C",
        sources,
        # No --use_fast_math: the epilogue must use IEEE division to match the reference bit for bit.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
