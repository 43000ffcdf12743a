"""bitdistill: turn Hugging Face causal LMs into BitNet b1.58 models (ternary weights, int8 activations).

Public API::

    from bitdistill import BitLinear, replace_linear_with_bitlinear
    report = replace_linear_with_bitlinear(model)   # in place; model is now a BitNet student

Importing this package imports no CUDA-only code and no Triton. The distillation names
(``DistillationTrainer``, ``run_distillation``, ...) and the run-audit names (``AuditCallback``,
``write_provenance``) are imported on first use, because they pull in ``transformers.Trainer``.
"""

import importlib

from bitdistill.convert import load_causal_lm
from bitdistill.export import (
    PackReport,
    load_packed,
    pack_in_memory,
    pack_model,
    save_packed,
    unpack_to_student,
)
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
    early_exit_logits,
    early_exit_perplexity,
    self_distillation_loss,
)

__version__ = "0.1.0"

_LAZY = {
    "AuditCallback": "bitdistill.audit",
    "write_provenance": "bitdistill.audit",
    "DistillationTrainer": "bitdistill.distill",
    "run_distillation": "bitdistill.distill",
    "run_cache_teacher": "bitdistill.distill",
    "insert_subln": "bitdistill.distill",
    "strided_perplexity": "bitdistill.eval",
    "SelfDistillTrainer": "bitdistill.selfdistill.trainer",
    "load_multi_exit": "bitdistill.selfdistill.run",
    "run_self_distillation": "bitdistill.selfdistill.run",
    "evaluate_tasks": "bitdistill.eval",
    "load_for_eval": "bitdistill.eval",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bitdistill' has no attribute {name!r}")


__all__ = [
    "AuditCallback",
    "BitConv1D",
    "BitLinear",
    "BitLinearFunction",
    "BitRMSNorm",
    "ConversionReport",
    "DistillationTrainer",
    "MultiExitLM",
    "PackReport",
    "PackedBitLinear",
    "SelfDistillConfig",
    "SelfDistillModel",
    "SelfDistillTrainer",
    "__version__",
    "activation_quant",
    "bitlinear",
    "bitlinear_reference",
    "early_exit_generate",
    "early_exit_logits",
    "early_exit_perplexity",
    "evaluate_tasks",
    "fake_quant_activation",
    "fake_quant_weight",
    "insert_subln",
    "load_causal_lm",
    "load_for_eval",
    "load_multi_exit",
    "load_packed",
    "load_student",
    "matches_module_pattern",
    "pack_in_memory",
    "pack_model",
    "pack_ternary",
    "packed_linear_reference",
    "replace_linear_with_bitlinear",
    "run_cache_teacher",
    "run_distillation",
    "run_self_distillation",
    "save_packed",
    "self_distillation_loss",
    "strided_perplexity",
    "student_marker",
    "unpack_ternary",
    "unpack_to_student",
    "weight_quant",
    "write_provenance",
]
