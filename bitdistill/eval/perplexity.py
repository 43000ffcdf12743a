"""Standard strided (sliding-window) perplexity of a causal LM over one long token sequence.

Windows of ``max_length`` tokens start every ``stride`` tokens; each window scores only the tokens
not scored by the previous one (the first window scores all but its first token), with the
preceding ``max_length - (scored)`` tokens as context. ``stride == max_length`` gives non-overlapping
windows. Perplexity = ``exp(total NLL / scored tokens)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PerplexityResult", "strided_perplexity"]


@dataclass
class PerplexityResult:
    """``perplexity``, the mean token ``nll``, ``num_tokens`` scored and ``num_windows`` evaluated."""

    perplexity: float
    nll: float
    num_tokens: int
    num_windows: int


@torch.no_grad()
def strided_perplexity(model: nn.Module, input_ids: torch.Tensor, *, max_length: int, stride: int | None = None,
                       max_windows: int | None = None) -> PerplexityResult:
    """Strided perplexity of ``model`` on ``input_ids [N]`` (1-D).

    Args:
        max_length: window length (at most the model's context).
        stride: step between window starts (default ``max_length``, non-overlapping), ``1..max_length``.
        max_windows: evaluate only the first windows (a quick estimate).
    """
    if input_ids.dim() != 1 or input_ids.numel() < 2:
        raise ValueError(f"expected a 1-D token sequence of at least 2 tokens, got shape {tuple(input_ids.shape)}")
    stride = stride or max_length
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(f"perplexity window {max_length} exceeds the model's context of {limit} tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens, windows, prev_end = 0.0, 0, 0, 0
    n = input_ids.numel()
    try:
        for begin in range(0, n, stride):
            end = min(begin + max_length, n)
            ids = input_ids[begin:end].to(device)[None]
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = ids[0, 1:]
            score_from = max(prev_end - begin - 1, 0)
            nll = F.cross_entropy(logits[score_from:], targets[score_from:], reduction="sum")
            total_nll += nll.item()
            total_tokens += targets.numel() - score_from
            windows += 1
            prev_end = end
            if end == n or (max_windows is not None and windows >= max_windows):
                break
    finally:
        model.train(was_training)
    mean = total_nll / max(total_tokens, 1)
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, num_tokens=total_tokens, num_windows=windows)
