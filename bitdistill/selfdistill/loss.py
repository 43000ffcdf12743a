"""The self-distillation loss of "Be Your Own Teacher" (Zhang et al., 2019), for causal LMs.

For per-block exits ``i`` with logits ``z_i`` and features ``h_i``, and the deepest exit ``z_D``, ``h_D``::

    L = CE(z_D) + sum_i w_i * ((1 - alpha) * CE(z_i) + alpha * tau^2 * KL(sg(p_D^tau) || p_i^tau))
                + lambda * sum_i || bottleneck_i(h_i) - sg(h_D) ||^2

where ``p^tau = softmax(z / tau)``, ``sg`` is stop-gradient (the deepest exit is the teacher signal,
not trained by the KL or hint terms), CE is next-token cross-entropy, every term is averaged over the
predicted tokens (labels ``!= -100``), and the hint is the mean squared error per token summed over
the hidden dimension. Defaults follow the paper's released code: ``alpha = 0.1``, ``tau = 3``,
``lambda = 1e-6`` (the hint weight is tiny because the L2 is summed over features), ``w_i = 1``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bitdistill.distill.losses import divergence
from bitdistill.errors import UserError

__all__ = ["Bottleneck", "SelfDistillConfig", "SelfDistillModel", "self_distillation_loss"]


@dataclass
class SelfDistillConfig:
    """Coefficients of :func:`self_distillation_loss` (defaults from the paper's code)."""

    alpha: float = field(default=0.1, metadata={"help": "weight of the KL to the deepest exit vs CE, per exit"})
    temperature: float = field(default=3.0, metadata={"help": "softmax temperature tau of the KL term"})
    hint_weight: float = field(default=1e-6, metadata={"help": "lambda, weight of the L2 feature hints"})
    exit_weights: Sequence[float] | None = field(default=None, metadata={"help": "w_i per exit (default 1)"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if self.hint_weight < 0:
            raise UserError(f"hint_weight must be >= 0, got {self.hint_weight}")

    def to_json_string(self) -> str:
        """The coefficients as JSON (what transformers' TensorBoard callback records as the model config)."""
        return json.dumps(dataclasses.asdict(self), indent=2, default=list)


class Bottleneck(nn.Module):
    """The hint adapter ``h -> W_2 relu(W_1 h)`` with ``W_1 [r, H]``, ``W_2 [H, r]``, ``r = H // 4``."""

    def __init__(self, hidden: int, rank: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        rank = rank or max(1, hidden // 4)
        self.down = nn.Linear(hidden, rank, device=device, dtype=dtype)
        self.up = nn.Linear(rank, hidden, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(h)))


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token alignment: logits ``[B, T-1, V]`` flattened to ``[N, V]`` and labels ``[N]``."""
    return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)


def self_distillation_loss(
    logits: Sequence[torch.Tensor],
    hidden: Sequence[torch.Tensor],
    labels: torch.Tensor,
    config: SelfDistillConfig,
    bottlenecks: Sequence[nn.Module] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts.

    Args:
        logits: per exit ``[B, T, V]``, shallowest first, the deepest last.
        hidden: per exit ``[B, T, H]`` block features, same order.
        labels: ``[B, T]`` token ids with ``-100`` where no prediction is scored (shifted inside).
        config: coefficients.
        bottlenecks: one hint adapter per non-deepest exit (needed when ``hint_weight > 0``).

    Returns:
        ``(loss, parts)`` where ``parts`` has ``ce_<i>``, ``kl_<i>``, ``hint_<i>`` (detached) for each exit.
    """
    n = len(logits) - 1
    weights = list(config.exit_weights) if config.exit_weights is not None else [1.0] * n
    if len(weights) != n:
        raise UserError(f"exit_weights has {len(weights)} entries for {n} non-deepest exits")
    if config.hint_weight > 0 and (bottlenecks is None or len(bottlenecks) != n):
        raise UserError(f"hint_weight > 0 needs one bottleneck per non-deepest exit ({n})")
    tau = config.temperature
    deep_logits, flat_labels = _shifted(logits[-1], labels)
    mask = flat_labels != -100
    count = mask.sum().clamp(min=1)
    deep_ce = F.cross_entropy(deep_logits, flat_labels, ignore_index=-100, reduction="sum") / count
    parts = {f"ce_{n}": deep_ce.detach()}
    total = deep_ce
    teacher = F.log_softmax(deep_logits.detach().float() / tau, dim=-1)
    for i in range(n):
        z, _ = _shifted(logits[i], labels)
        ce = F.cross_entropy(z, flat_labels, ignore_index=-100, reduction="sum") / count
        student = F.log_softmax(z.float() / tau, dim=-1)
        kl_tok = divergence(student, teacher, "forward_kl")
        kl = (kl_tok * mask).sum() / count
        total = total + weights[i] * ((1 - config.alpha) * ce + config.alpha * tau**2 * kl)
        parts[f"ce_{i}"], parts[f"kl_{i}"] = ce.detach(), kl.detach()
        if config.hint_weight > 0:
            h = bottlenecks[i](hidden[i])[:, :-1]
            target = hidden[-1].detach()[:, :-1]
            hint_tok = (h - target).float().pow(2).sum(-1).reshape(-1)
            hint = (hint_tok * mask).sum() / count
            total = total + config.hint_weight * hint
            parts[f"hint_{i}"] = hint.detach()
    return total, parts


class SelfDistillModel(nn.Module):
    """A :class:`~bitdistill.selfdistill.exits.MultiExitLM` plus its hint bottlenecks and loss.

    ``forward(input_ids, attention_mask=None, labels=None)`` returns ``(loss, parts, exits_output)``;
    labels default to ``input_ids`` with padding (``attention_mask == 0``) set to ``-100``.
    """

    def __init__(self, multi_exit, config: SelfDistillConfig | None = None) -> None:
        super().__init__()
        self.config = config or SelfDistillConfig()
        if multi_exit.variant == "concat" and self.config.hint_weight > 0:
            raise UserError("feature hints need per-block exits, but variant 'concat' has one fused classifier; "
                            "set hint_weight=0 or use variant 'shared'/'separate'")
        self.multi_exit = multi_exit
        head = multi_exit.model.get_output_embeddings()
        n = len(multi_exit.exit_layers) if multi_exit.variant != "concat" else 1
        if self.config.exit_weights is not None and len(self.config.exit_weights) != n:
            raise UserError(f"exit_weights has {len(self.config.exit_weights)} entries but the model has {n} "
                            "non-deepest exits; give one weight per exit")
        self.bottlenecks = nn.ModuleList(
            Bottleneck(head.in_features, device=head.weight.device, dtype=head.weight.dtype) for _ in range(n)
        ) if self.config.hint_weight > 0 else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None):
        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
        out = self.multi_exit(input_ids, attention_mask)
        loss, parts = self_distillation_loss(out.logits, out.hidden, labels, self.config, self.bottlenecks)
        return loss, parts, out
