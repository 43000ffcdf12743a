"""Evaluation: strided perplexity."""

from bitdistill.eval.perplexity import PerplexityResult, strided_perplexity

__all__ = ["PerplexityResult", "strided_perplexity"]
