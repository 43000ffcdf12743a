"""bitdistill: turn Hugging Face causal LMs into BitNet b1.58 models (ternary weights, int8 activations).

Public API::

    from bitdistill import BitLinear, replace_linear_with_bitlinear
    report = replace_linear_with_bitlinear(model)   # in place; model is now a BitNet student

Every public name is imported on first use (PEP 562), so ``import bitdistill`` (and ``bitdistill --version``)
imports neither torch nor transformers; no name imports CUDA-only code or Triton. See ``docs/architecture.md``
for the layers these names come from.
"""

from bitdistill._lazy import lazy_getattr
from bitdistill._version import __version__

_WHERE = {
    "BitNetConfig": "bitdistill.nn.config",
    "bitnet_config": "bitdistill.nn.config",
    "folder_kind": "bitdistill.nn.config",
    "keep_freed_memory": "bitdistill.allocator",
    "AuditCallback": "bitdistill.audit",
    "DISTILL_DEFAULTS": "bitdistill.distill.args",
    "DistillationTrainer": "bitdistill.distill",
    "distill_student": "bitdistill.distill.engine",
    "run_distillation": "bitdistill.distill",
    "evaluate_tasks": "bitdistill.eval",
    "generate_text": "bitdistill.eval.generate",
    "load_for_eval": "bitdistill.eval",
    "load_causal_lm": "bitdistill.convert",
    "PackReport": "bitdistill.export",
    "load_packed": "bitdistill.export",
    "pack_in_memory": "bitdistill.export",
    "pack_model": "bitdistill.export",
    "save_packed": "bitdistill.export",
    "unpack_to_student": "bitdistill.export",
    "pack_gguf": "bitdistill.export.gguf",
    "save_gguf": "bitdistill.export.gguf",
    "BitConv1D": "bitdistill.nn",
    "BitLinear": "bitdistill.nn",
    "BitRMSNorm": "bitdistill.nn",
    "FastDecoder": "bitdistill.nn",
    "generate_fast": "bitdistill.nn",
    "PackedBitLinear": "bitdistill.nn",
    "bitlinear": "bitdistill.nn",
    "load_student": "bitdistill.nn",
    "replace_linear_with_bitlinear": "bitdistill.nn",
    "insert_subln": "bitdistill.nn.subln",
    "activation_quant": "bitdistill.quant",
    "weight_quant": "bitdistill.quant",
    "fully_shard_student": "bitdistill.fsdp.shard",
    "save_sharded_student": "bitdistill.fsdp.shard",
    "use_ternary_all_gather": "bitdistill.fsdp.ternary",
    "LiveTensorBytes": "bitdistill.live_memory",
    "MultiExitLM": "bitdistill.selfdistill",
    "SelfDistillConfig": "bitdistill.selfdistill",
    "SelfDistillModel": "bitdistill.selfdistill",
    "early_exit_generate": "bitdistill.selfdistill",
    "early_exit_logits": "bitdistill.selfdistill",
    "early_exit_perplexity": "bitdistill.selfdistill",
    "load_multi_exit": "bitdistill.selfdistill.run",
    "SelfDistillTrainer": "bitdistill.selfdistill.trainer",
    "BlockwiseConfig": "bitdistill.recover",
    "calibrated_ternary": "bitdistill.recover",
    "encode_ternary": "bitdistill.recover",
    "reconstruct_blocks_in_place": "bitdistill.recover",
    "JointConfig": "bitdistill.recover",
    "reconstruct_jointly_in_place": "bitdistill.recover",
    "RecoverArguments": "bitdistill.recover.staged",
    "run_staged_recovery": "bitdistill.recover.staged",
    "recover_defaults": "bitdistill.recover.staged",
}

__getattr__ = lazy_getattr(__name__, _WHERE)

__all__ = ["__version__", *sorted(_WHERE)]
