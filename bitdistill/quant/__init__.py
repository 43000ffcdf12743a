"""Pure-torch BitNet b1.58 math: quantizers, the reference linear, and the 2-bit packed layout."""

from bitdistill.quant.packing import pack_ternary, packed_linear_reference, unpack_ternary
from bitdistill.quant.reference import (
    EPS,
    activation_quant,
    bitlinear_reference,
    fake_quant_activation,
    fake_quant_weight,
    int_matmul,
    weight_quant,
)

__all__ = [
    "EPS",
    "activation_quant",
    "bitlinear_reference",
    "fake_quant_activation",
    "fake_quant_weight",
    "int_matmul",
    "pack_ternary",
    "packed_linear_reference",
    "unpack_ternary",
    "weight_quant",
]
