"""Loaded by file path from ``wikitext_lastword.yaml`` (lm-eval's ``!function``); the builder is in bitdistill.eval.lastword."""

from bitdistill.eval.lastword import load_lastword_dataset

__all__ = ["load_lastword_dataset"]
