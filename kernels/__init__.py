"""Triton kernels for BitNet b1.58, installed and imported as ``bitdistill.kernels``.

This folder is mapped to ``bitdistill.kernels`` by ``pyproject.toml`` (a top-level ``kernels``
package would clash with Hugging Face's own). Importing it imports no Triton: each kernel module
imports Triton itself, so ``import bitdistill`` stays free of GPU-only code.
"""

__all__: list[str] = []
