"""Modules: BitLinear (quantization-aware training), PackedBitLinear (packed inference), the model converter
and its config (``BitNetConfig``), SubLN, and the per-architecture module table."""

from bitdistill.nn.bitlinear import BitConv1D, BitLinear, BitLinearFunction, BitRMSNorm, bitlinear
from bitdistill.nn.config import BitNetConfig, bitnet_config, folder_kind
from bitdistill.nn.packed import PackedBitLinear
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
    "BitNetConfig",
    "BitRMSNorm",
    "ConversionReport",
    "PackedBitLinear",
    "bitlinear",
    "bitnet_config",
    "folder_kind",
    "load_student",
    "matches_module_pattern",
    "replace_linear_with_bitlinear",
    "student_marker",
]
