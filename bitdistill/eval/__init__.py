"""Evaluation: strided perplexity, and lm-evaluation-harness tasks (``bitdistill[eval]``; lm-eval imported lazily)."""

from bitdistill.eval.harness import (
    EvalExtraMissing,
    evaluate_tasks,
    list_tasks,
    load_for_eval,
    validate_tasks,
)
from bitdistill.eval.perplexity import PerplexityResult, strided_perplexity

__all__ = [
    "EvalExtraMissing",
    "PerplexityResult",
    "evaluate_tasks",
    "list_tasks",
    "load_for_eval",
    "strided_perplexity",
    "validate_tasks",
]
