"""bitdistill: turn Hugging Face causal LMs into BitNet b1.58 models (ternary weights, int8 activations).

Public API::

    from bitdistill import BitLinear, replace_linear_with_bitlinear
    report = replace_linear_with_bitlinear(model)   # in place; model is now a BitNet student

Importing this package imports no CUDA-only code and no Triton.
"""

from bitdistill.export import PackReport, load_packed, pack_model, save_packed, unpack_to_student
from bitdistill.nn import (
    BitConv1D,
    BitLinear,
    BitLinearFunction,
    BitRMSNorm,
    ConversionReport,
    PackedBitLinear,
    bitlinear,
    load_student,
    matches_module_pattern,
    replace_linear_with_bitlinear,
    student_marker,
)
from bitdistill.quant import (
    activation_quant,
    bitlinear_reference,
    fake_quant_activation,
    fake_quant_weight,
    pack_ternary,
    packed_linear_reference,
    unpack_ternary,
    weight_quant,
)
from bitdistill.selfdistill import (
    MultiExitLM,
    SelfDistillConfig,
    SelfDistillModel,
    early_exit_generate,
    self_distillation_loss,
)

__version__ = "0.1.0"

__all__ = [
    "BitConv1D",
    "BitLinear",
    "BitLinearFunction",
    "BitRMSNorm",
    "ConversionReport",
    "MultiExitLM",
    "SelfDistillConfig",
    "SelfDistillModel",
    "PackReport",
    "PackedBitLinear",
    "__version__",
    "activation_quant",
    "bitlinear",
    "bitlinear_reference",
    "early_exit_generate",
    "fake_quant_activation",
    "fake_quant_weight",
    "load_packed",
    "load_student",
    "matches_module_pattern",
    "pack_model",
    "pack_ternary",
    "packed_linear_reference",
    "replace_linear_with_bitlinear",
    "self_distillation_loss",
    "save_packed",
    "student_marker",
    "unpack_ternary",
    "unpack_to_student",
    "weight_quant",
]
