"""Standard strided (sliding-window) perplexity of a causal LM over one long token sequence.

Windows of ``max_length`` tokens start every ``stride`` tokens; each window scores only the tokens
not scored by the previous one (the first window scores all but its first token), with the
preceding ``max_length - (scored)`` tokens as context. ``stride == max_length`` gives non-overlapping
windows. Perplexity = ``exp(total NLL / scored tokens)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitdistill.errors import UserError

__all__ = ["PerplexityResult", "strided_perplexities", "strided_perplexity"]


@dataclass
class PerplexityResult:
    """``perplexity``, the mean token ``nll``, ``num_tokens`` scored and ``num_windows`` evaluated."""

    perplexity: float
    nll: float
    num_tokens: int
    num_windows: int


def strided_perplexity(model: nn.Module, input_ids: torch.Tensor, *, max_length: int, stride: int | None = None,
                       max_windows: int | None = None) -> PerplexityResult:
    """Strided perplexity of ``model`` on ``input_ids [N]`` (1-D).

    Args:
        max_length: window length (at most the model's context).
        stride: step between window starts (default ``max_length``, non-overlapping), ``1..max_length``.
        max_windows: evaluate only the first windows (a quick estimate).
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise UserError(f"perplexity window {max_length} exceeds the model's context of {limit} tokens")
    return strided_perplexities(lambda ids: [model(input_ids=ids).logits], model, input_ids, max_length=max_length,
                                stride=stride, max_windows=max_windows)[0]


@torch.no_grad()
def strided_perplexities(logits_fn: Callable[[torch.Tensor], Sequence[torch.Tensor]], module: nn.Module,
                         input_ids: torch.Tensor, *, max_length: int, stride: int | None = None,
                         max_windows: int | None = None) -> list[PerplexityResult]:
    """Strided perplexity of several predictors computed together (e.g. every exit of a multi-exit model).

    Args:
        logits_fn: window ``ids [1, L]`` -> a sequence of logits ``[1, L, V]``, one per predictor.
        module: the module evaluated (put in eval mode for the duration; gives the device).
        input_ids, max_length, stride, max_windows: as in :func:`strided_perplexity`.

    Returns:
        one :class:`PerplexityResult` per predictor, over the same scored tokens.
    """
    if input_ids.dim() != 1 or input_ids.numel() < 2:
        raise UserError(f"expected a 1-D token sequence of at least 2 tokens, got shape {tuple(input_ids.shape)}")
    stride = stride or max_length
    if not 1 <= stride <= max_length:
        raise UserError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    totals: list[float] = []
    total_tokens, windows, prev_end = 0, 0, 0
    n = input_ids.numel()
    try:
        for begin in range(0, n, stride):
            end = min(begin + max_length, n)
            ids = input_ids[begin:end].to(device)[None]
            targets = ids[0, 1:]
            score_from = max(prev_end - begin - 1, 0)
            outputs = logits_fn(ids)
            if not totals:
                totals = [0.0] * len(outputs)
            for j, logits in enumerate(outputs):
                nll = F.cross_entropy(logits[0, :-1].float()[score_from:], targets[score_from:], reduction="sum")
                totals[j] += nll.item()
            total_tokens += targets.numel() - score_from
            windows += 1
            prev_end = end
            if end == n or (max_windows is not None and windows >= max_windows):
                break
    finally:
        module.train(was_training)
    results = []
    for total in totals:
        mean = total / max(total_tokens, 1)
        results.append(PerplexityResult(perplexity=math.exp(mean), nll=mean, num_tokens=total_tokens,
                                        num_windows=windows))
    return results
