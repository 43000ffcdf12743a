"""Knowledge distillation from a full-precision teacher into a BitNet b1.58 student (``bitdistill distill``).

Every name is imported on first use: importing a loss does not import ``transformers.Trainer``.
"""

from bitdistill._lazy import lazy_getattr

_WHERE = {
    "LAYER_MAP_STRATEGIES": "bitdistill.distill.layer_map",
    "LOGIT_LOSSES": "bitdistill.distill.losses",
    "LOSS_TERMS": "bitdistill.distill.losses",
    "CacheArguments": "bitdistill.distill.args",
    "DataArguments": "bitdistill.distill.args",
    "DistillationTrainer": "bitdistill.distill.trainer",
    "Distilled": "bitdistill.distill.engine",
    "LOSS_REGISTRY": "bitdistill.distill.terms",
    "LossInputs": "bitdistill.distill.terms",
    "LossTerm": "bitdistill.distill.terms",
    "LossArguments": "bitdistill.distill.args",
    "ModelArguments": "bitdistill.distill.args",
    "QKVCapture": "bitdistill.distill.attention",
    "QuantWarmup": "bitdistill.distill.warmup",
    "TeacherCache": "bitdistill.distill.teacher_cache",
    "attention_relation_loss": "bitdistill.distill.losses",
    "build_layer_map": "bitdistill.distill.layer_map",
    "cache_teacher_logits": "bitdistill.distill.teacher_cache",
    "cached_logits_loss": "bitdistill.distill.teacher_cache",
    "cross_entropy_loss": "bitdistill.distill.losses",
    "distill_student": "bitdistill.distill.engine",
    "divergence": "bitdistill.distill.losses",
    "freeze_embeddings": "bitdistill.distill.embeddings",
    "hidden_state_loss": "bitdistill.distill.losses",
    "insert_subln": "bitdistill.nn.subln",
    "logits_distillation_loss": "bitdistill.distill.losses",
    "model_card": "bitdistill.distill.card",
    "prediction_mask": "bitdistill.distill.losses",
    "register_loss_term": "bitdistill.distill.terms",
    "run_cache_teacher": "bitdistill.distill.run",
    "run_distillation": "bitdistill.distill.run",
    "student_from_config": "bitdistill.distill.embeddings",
    "transfer_embeddings": "bitdistill.distill.embeddings",
}

__getattr__ = lazy_getattr(__name__, _WHERE)

__all__ = sorted(_WHERE)
