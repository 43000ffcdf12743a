"""Self-distillation for causal LMs ("Be Your Own Teacher"): multi-exit wrapper, loss, early-exit decoding."""

from bitdistill.selfdistill.early_exit import (
    EarlyExitResult,
    early_exit_generate,
    early_exit_logits,
    early_exit_perplexity,
)
from bitdistill.selfdistill.exits import EXIT_VARIANTS, MultiExitLM, MultiExitOutput, find_blocks
from bitdistill.selfdistill.loss import (
    Bottleneck,
    SelfDistillConfig,
    SelfDistillModel,
    self_distillation_loss,
)

__all__ = [
    "EXIT_VARIANTS",
    "Bottleneck",
    "EarlyExitResult",
    "MultiExitLM",
    "MultiExitOutput",
    "SelfDistillConfig",
    "SelfDistillModel",
    "early_exit_generate",
    "early_exit_logits",
    "early_exit_perplexity",
    "find_blocks",
    "self_distillation_loss",
]
