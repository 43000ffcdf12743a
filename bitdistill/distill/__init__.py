"""Knowledge distillation from a full-precision teacher into a BitNet b1.58 student (``bitdistill distill``)."""

from bitdistill.distill.args import CacheArguments, DataArguments, LossArguments, ModelArguments
from bitdistill.distill.attention import QKVCapture
from bitdistill.distill.card import model_card
from bitdistill.distill.embeddings import freeze_embeddings, student_from_config, transfer_embeddings
from bitdistill.distill.layer_map import LAYER_MAP_STRATEGIES, build_layer_map
from bitdistill.distill.losses import (
    LOGIT_LOSSES,
    attention_relation_loss,
    cross_entropy_loss,
    divergence,
    hidden_state_loss,
    logits_distillation_loss,
    prediction_mask,
)
from bitdistill.distill.run import run_cache_teacher, run_distillation
from bitdistill.distill.subln import insert_subln
from bitdistill.distill.teacher_cache import TeacherCache, cache_teacher_logits, cached_logits_loss
from bitdistill.distill.trainer import DistillationTrainer
from bitdistill.distill.warmup import QuantWarmup

__all__ = [
    "LAYER_MAP_STRATEGIES",
    "LOGIT_LOSSES",
    "CacheArguments",
    "DataArguments",
    "DistillationTrainer",
    "LossArguments",
    "ModelArguments",
    "QKVCapture",
    "QuantWarmup",
    "TeacherCache",
    "attention_relation_loss",
    "build_layer_map",
    "cache_teacher_logits",
    "cached_logits_loss",
    "cross_entropy_loss",
    "divergence",
    "freeze_embeddings",
    "hidden_state_loss",
    "insert_subln",
    "logits_distillation_loss",
    "model_card",
    "prediction_mask",
    "run_cache_teacher",
    "run_distillation",
    "student_from_config",
    "transfer_embeddings",
]
