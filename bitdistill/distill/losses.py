"""Distillation losses as pure functions of (student, teacher, mask, normalizer).

Conventions shared by every token-level loss here:

* ``mask [...]`` (bool) marks the token positions that count (padding and ``-100`` labels excluded);
  masked positions contribute exactly zero, even if their inputs are NaN/Inf.
* ``num_items`` is the number of valid tokens in the **whole accumulation window** (all micro-batches,
  all ranks). Each loss returns ``sum over valid tokens of the per-token loss / num_items``, so summing
  the returned values over the window's micro-batches gives the per-token mean over the window, whatever
  the split into micro-batches and ranks.
* Divergences are computed in float32 from log-probabilities, ``D(teacher || student)`` style with
  ``p`` = teacher, ``q`` = student, over the last dimension ("bins": the vocabulary, or the ``k + 1`` bins
  of a cached top-k teacher, see :mod:`bitdistill.distill.teacher_cache`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bitdistill.errors import UserError

__all__ = [
    "LOGIT_LOSSES",
    "LOSS_TERMS",
    "attention_relation_loss",
    "cross_entropy_loss",
    "divergence",
    "hidden_state_loss",
    "logits_distillation_loss",
    "masked_token_sum",
    "prediction_mask",
]

LOGIT_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd", "mse", "cosine")
#: The distillation trainer's loss terms: each has a ``--<term>_weight`` and is logged as ``loss_<term>``.
LOSS_TERMS = ("ce", "logits", "hidden", "attention")
_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")


def prediction_mask(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Which positions of a causal LM predict a valid target: ``labels [B, T]`` -> bool ``[B, T-1]``.

    Position ``t`` predicts ``labels[:, t+1]``; it counts when that label is not ``-100`` and, if given,
    ``attention_mask`` is 1 at both ``t`` and ``t+1`` (padding is never an input nor a target).
    """
    mask = labels[:, 1:] != -100
    if attention_mask is not None:
        am = attention_mask.bool()
        mask = mask & am[:, :-1] & am[:, 1:]
    return mask


def masked_token_sum(per_token: torch.Tensor, mask: torch.Tensor, num_items: torch.Tensor | float) -> torch.Tensor:
    """``sum(per_token[mask]) / num_items``; masked entries count as exactly 0 (NaN-safe)."""
    if per_token.shape != mask.shape:
        raise UserError(f"per-token loss shape {tuple(per_token.shape)} does not match mask shape {tuple(mask.shape)}")
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    return torch.where(mask, per_token, zero).sum() / num_items


def _xlogy_diff(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``sum a * (log a - log b)`` over the last dim with ``0 * log 0 = 0`` (KL(a || b))."""
    a = log_a.exp()
    diff = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))
    return (a * diff).sum(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """``log(weight_p * p + (1 - weight_p) * q)``, stable."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def divergence(log_q: torch.Tensor, log_p: torch.Tensor, kind: str = "forward_kl", *, beta: float = 0.5,
               alpha: float = 0.1) -> torch.Tensor:
    """Per-token divergence between student ``q`` and teacher ``p``, given log-probabilities ``[..., V]`` -> ``[...]``.

    * ``forward_kl``: ``KL(p || q)`` (mode covering; standard KD).
    * ``reverse_kl``: ``KL(q || p)`` (mode seeking).
    * ``jsd``: generalized JSD(beta) = ``beta KL(p || m) + (1-beta) KL(q || m)``, ``m = beta p + (1-beta) q``
      (GKD's definition; symmetric at beta = 0.5), ``0 < beta < 1``.
    * ``skew_kl``: ``KL(p || alpha p + (1-alpha) q)`` (DistiLLM's skew KL), ``0 <= alpha < 1``; alpha = 0 is forward KL.
    * ``tvd``: total variation ``0.5 * sum |p - q|``.
    """
    log_q = log_q.float()
    log_p = log_p.float()
    if kind == "forward_kl":
        return _xlogy_diff(log_p, log_q)
    if kind == "reverse_kl":
        return _xlogy_diff(log_q, log_p)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise UserError(f"jsd needs 0 < beta < 1, got beta={beta}")
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _xlogy_diff(log_p, log_m) + (1.0 - beta) * _xlogy_diff(log_q, log_m)
    if kind == "skew_kl":
        if not 0.0 <= alpha < 1.0:
            raise UserError(f"skew_kl needs 0 <= alpha < 1, got alpha={alpha}")
        if alpha == 0.0:
            return _xlogy_diff(log_p, log_q)
        return _xlogy_diff(log_p, _log_mix(log_p, log_q, alpha))
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise UserError(f"unknown divergence {kind!r}; choose one of {', '.join(_DIVERGENCES)}")


def logits_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    num_items: torch.Tensor | float,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Logit distillation loss, ``student_logits``/``teacher_logits [..., V]``, ``mask [...]`` -> scalar.

    Divergences (see :func:`divergence`) compare ``softmax(logits / temperature)`` and are multiplied by
    ``temperature**2`` (Hinton et al.), so gradient magnitudes do not shrink with the temperature.
    ``mse`` is the mean squared difference of the raw logits over the vocabulary and ``cosine`` is
    ``1 - cos(student, teacher)`` of the raw logit vectors; the temperature does not apply to them.
    """
    if student_logits.shape != teacher_logits.shape:
        raise UserError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                        f"{tuple(teacher_logits.shape)} differ; teacher and student need the same vocabulary")
    if temperature <= 0:
        raise UserError(f"temperature must be > 0, got {temperature}")
    s = student_logits.float()
    t = teacher_logits.float()
    if kind == "mse":
        per_token = (s - t).pow(2).mean(-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(s, t, dim=-1)
    elif kind in _DIVERGENCES:
        log_q = F.log_softmax(s / temperature, dim=-1)
        log_p = F.log_softmax(t / temperature, dim=-1)
        per_token = divergence(log_q, log_p, kind, beta=beta, alpha=alpha) * temperature**2
    else:
        raise UserError(f"unknown logit loss {kind!r}; choose one of {', '.join(LOGIT_LOSSES)}")
    return masked_token_sum(per_token, mask, num_items)


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: torch.Tensor | float) -> torch.Tensor:
    """Causal-LM cross-entropy: ``logits [B, T, V]`` predict ``labels [B, T]`` shifted by one; ``-100`` ignored.

    Returns the summed token NLL divided by ``num_items`` (the window's valid-token count).
    """
    v = logits.shape[-1]
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100,
                          reduction="sum")
    return nll / num_items


def hidden_state_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    layer_map: Sequence[tuple[int, Sequence[int]]],
    mask: torch.Tensor,
    num_items: torch.Tensor | float,
    *,
    kind: str = "mse",
    projectors: nn.ModuleList | None = None,
) -> torch.Tensor:
    """Hidden-state loss over a layer map.

    Args:
        student_hidden, teacher_hidden: per-layer states ``[B, T, H_s]`` / ``[B, T, H_t]`` (index 0 =
            embeddings, ``i`` = output of block ``i``, as transformers' ``output_hidden_states``).
        layer_map: pairs ``(student_index, teacher_indices)``; a student state is compared to each of its
            teacher states (1-to-N maps) and the terms averaged.
        mask: ``[B, T]`` bool, positions that count.
        num_items: valid tokens in the accumulation window.
        kind: ``mse`` (mean over the hidden dimension) or ``cosine`` (``1 - cos``).
        projectors: one module per ``layer_map`` entry mapping ``H_s -> H_t`` (needed when widths differ).

    Returns:
        The per-pair losses averaged over the map, each summed over valid tokens / ``num_items``.
    """
    if not layer_map:
        raise UserError("hidden_state_loss needs a non-empty layer map")
    if projectors is not None and len(projectors) != len(layer_map):
        raise UserError(f"{len(projectors)} projectors for {len(layer_map)} layer-map entries")
    total = 0.0
    for i, (s_idx, t_indices) in enumerate(layer_map):
        s = student_hidden[s_idx]
        if projectors is not None:
            s = projectors[i](s)
        s = s.float()
        terms = []
        for t_idx in t_indices:
            t = teacher_hidden[t_idx].float()
            if s.shape != t.shape:
                raise UserError(f"student hidden state {s_idx} has shape {tuple(s.shape)} but teacher state {t_idx} "
                                f"has {tuple(t.shape)}; enable the hidden projector")
            if kind == "mse":
                terms.append((s - t).pow(2).mean(-1))
            elif kind == "cosine":
                terms.append(1.0 - F.cosine_similarity(s, t, dim=-1))
            else:
                raise UserError(f"unknown hidden-state loss {kind!r}; choose mse or cosine")
        total = total + masked_token_sum(torch.stack(terms).mean(0), mask, num_items)
    return total / len(layer_map)


def _relation_log_probs(x: torch.Tensor, heads: int, key_mask: torch.Tensor | None) -> torch.Tensor:
    """MiniLMv2 self-relation ``log softmax(A_h A_h^T / sqrt(d_h))``: ``x [B, T, D]`` -> ``[B, heads, T, T]``."""
    b, t, d = x.shape
    if d % heads:
        raise UserError(f"a Q/K/V width of {d} cannot be split into {heads} relation heads; pick a divisor of {d}")
    a = x.float().reshape(b, t, heads, d // heads).transpose(1, 2)
    scores = a @ a.transpose(-1, -2) / math.sqrt(d // heads)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    return F.log_softmax(scores, dim=-1)


def attention_relation_loss(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    mask: torch.Tensor,
    num_items: torch.Tensor | float,
    *,
    num_relation_heads: int,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MiniLMv2 self-attention relation loss (as used by BitDistill) over matched Q/K/V states.

    For each pair (student ``[B, T, D_s]``, teacher ``[B, T, D_t]``: the Q, K or V projections of one
    layer; with grouped-query attention K/V *before* head repetition), both are split into
    ``num_relation_heads`` relation heads, turned into relations ``softmax(A A^T / sqrt(d))`` over the keys,
    and compared with ``KL(teacher || student)`` per query token, averaged over relation heads. Widths may
    differ; the relation matrices are ``T x T`` for both.

    Args:
        mask: ``[B, T]`` bool, query positions that count.
        key_mask: ``[B, T]`` attention mask; padded keys are excluded from the relations.

    Returns:
        The mean over pairs of ``sum over valid query tokens / num_items``.
    """
    if len(student_states) != len(teacher_states) or not student_states:
        raise UserError(f"need matching, non-empty Q/K/V lists (got {len(student_states)} student and "
                        f"{len(teacher_states)} teacher states)")
    total = 0.0
    for s, t in zip(student_states, teacher_states, strict=True):
        log_q = _relation_log_probs(s, num_relation_heads, key_mask)
        log_p = _relation_log_probs(t, num_relation_heads, key_mask)
        per_token = divergence(log_q, log_p, "forward_kl").mean(1)
        total = total + masked_token_sum(per_token, mask, num_items)
    return total / len(student_states)
