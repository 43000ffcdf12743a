"""Modules: BitLinear (quantization-aware training) and the converter for whole models."""

from bitdistill.nn.bitlinear import BitConv1D, BitLinear, BitLinearFunction, BitRMSNorm, bitlinear
from bitdistill.nn.replace import (
    ConversionReport,
    load_student,
    matches_module_pattern,
    replace_linear_with_bitlinear,
    student_marker,
)

__all__ = [
    "BitConv1D",
    "BitLinear",
    "BitLinearFunction",
    "BitRMSNorm",
    "ConversionReport",
    "bitlinear",
    "load_student",
    "matches_module_pattern",
    "replace_linear_with_bitlinear",
    "student_marker",
]
