"""Triton kernels for BitNet b1.58 (``bitdistill.kernels``; inside the package, because a top-level ``kernels``
folder in the checkout shadows Hugging Face's own ``kernels`` package).

Importing it imports no Triton: each kernel module imports Triton itself, so ``import bitdistill`` stays free of
GPU-only code.
"""

__all__: list[str] = []
