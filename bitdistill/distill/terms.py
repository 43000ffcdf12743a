"""The loss-term registry: every term of the distillation loss is one pure function and one :class:`LossTerm` entry.

From an entry derive its flag (``--<name>_weight``, a field of :func:`loss_arguments_type`), its validation
(:func:`validate_loss_args`), which outputs the student's and the teacher's forwards must produce
(:func:`needed_outputs`: logits, hidden states, attention Q/K/V), its log key (``loss_<name>``) and its line in the
model card (:func:`describe_loss`). ``DistillationTrainer.compute_loss`` evaluates the active entries on one
:class:`LossInputs`. A new term::

    def my_loss(x: LossInputs, loss_args) -> torch.Tensor:  # sum over x.mask / x.num_items (see losses.py)
        ...

    register_loss_term(LossTerm("mine", my_loss, teacher_outputs=frozenset({"logits"}), help="...",
                                describe=lambda a: "my loss between the next-token logits"))

and ``bitdistill distill --mine_weight 0.5`` trains with it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bitdistill.distill.args import LossArguments
from bitdistill.distill.losses import (
    attention_relation_loss,
    cross_entropy_loss,
    hidden_state_loss,
    logits_distillation_loss,
)
from bitdistill.distill.teacher_cache import cached_logits_loss
from bitdistill.errors import UserError

__all__ = ["LOSS_REGISTRY", "OUTPUTS", "LossInputs", "LossTerm", "active_terms", "describe_loss",
           "loss_arguments_type", "needed_outputs", "register_loss_term", "validate_loss_args"]

#: What a term may need of a forward: the logits, every block's hidden states, the Q/K/V of the relation blocks.
OUTPUTS = ("logits", "hidden_states", "qkv")


@dataclass
class LossInputs:
    """One micro-batch's tensors, as the loss terms read them (``T`` the sequence length, positions shifted so that
    position ``t`` predicts token ``t + 1``).

    Attributes:
        logits: the student's logits ``[B, T, V]`` (unshifted); labels: ``[B, T]``.
        mask: bool ``[B, T-1]``, the positions that count; num_items: the window's count of them (see losses.py).
        student_logits: ``[B, T-1, V]``; teacher_logits: the teacher's, or ``None`` (no teacher forward, or a cache).
        cached: ``(top-k ids, top-k log-probs, tail log-mass)`` of a teacher cache, or ``None``.
        student_hidden / teacher_hidden: every block's hidden states ``[B, T-1, H]`` (embedding output first).
        layer_map: ``(student layer, teacher layers)`` pairs; projectors: per-pair student -> teacher widths.
        student_qkv / teacher_qkv: Q, K, V ``[B, T-1, D]`` of each relation block; key_mask: ``[B, T-1]`` or ``None``.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    num_items: torch.Tensor | float
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    student_hidden: Sequence[torch.Tensor] | None = None
    teacher_hidden: Sequence[torch.Tensor] | None = None
    layer_map: list | None = None
    projectors: nn.ModuleList | None = None
    student_qkv: Sequence[torch.Tensor] | None = None
    teacher_qkv: Sequence[torch.Tensor] | None = None
    key_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class LossTerm:
    """One term of the distillation loss.

    Attributes:
        name: its flag is ``--<name>_weight``, its log key ``loss_<name>``.
        loss: the pure function ``(LossInputs, loss_args) -> scalar``.
        describe: ``loss_args -> str``, what the term compares, for the model card (the weight is prefixed).
        help: the weight flag's help.
        teacher_outputs / student_outputs: what of :data:`OUTPUTS` the forwards must produce for it (a term that
            needs the teacher's outputs beyond its logits cannot run from a teacher cache).
        default_weight: the weight flag's default.
        check: ``loss_args -> None``, raising :class:`UserError` for bad values of the term's own options.
    """

    name: str
    loss: Callable[[LossInputs, object], torch.Tensor]
    describe: Callable[[object], str]
    help: str
    teacher_outputs: frozenset[str] = frozenset({"logits"})
    student_outputs: frozenset[str] = frozenset({"logits"})
    default_weight: float = 0.0
    check: Callable[[object], None] | None = None

    @property
    def flag(self) -> str:
        return f"--{self.name}_weight"


#: Every registered term by name, in flag order; :func:`register_loss_term` adds one.
LOSS_REGISTRY: dict[str, LossTerm] = {}


def register_loss_term(term: LossTerm) -> LossTerm:
    """Add ``term`` to :data:`LOSS_REGISTRY` (refused for a taken name or an unknown output); returns it."""
    if term.name in LOSS_REGISTRY:
        raise ValueError(f"a loss term named {term.name!r} is registered already")
    unknown = (term.teacher_outputs | term.student_outputs) - set(OUTPUTS)
    if unknown or not term.name.isidentifier():
        raise ValueError(f"loss term {term.name!r}: outputs must be among {OUTPUTS} (got {sorted(unknown)}) and the "
                         "name an identifier")
    LOSS_REGISTRY[term.name] = term
    return term


def weight(loss_args, term: LossTerm) -> float:
    return getattr(loss_args, f"{term.name}_weight", term.default_weight)


def active_terms(loss_args) -> list[tuple[LossTerm, float]]:
    """The registered terms with a weight above 0 and their weights."""
    return [(t, w) for t in LOSS_REGISTRY.values() if (w := weight(loss_args, t)) > 0]


def needed_outputs(loss_args) -> tuple[frozenset[str], frozenset[str]]:
    """``(student outputs, teacher outputs)`` the active terms need (subsets of :data:`OUTPUTS`)."""
    student, teacher = set(), set()
    for t, _ in active_terms(loss_args):
        student |= t.student_outputs
        teacher |= t.teacher_outputs
    return frozenset(student), frozenset(teacher)


def describe_loss(loss_args) -> str:
    """The model card's account of the loss: ``"w x what + ..."`` over the active terms."""
    return " + ".join(f"{w:g} x {t.describe(loss_args)}" for t, w in active_terms(loss_args))


def loss_arguments_type() -> type:
    """:class:`LossArguments`, extended with a ``<name>_weight`` field for each registered term it lacks."""
    have = {f.name for f in dataclasses.fields(LossArguments)}
    extra = [(f"{t.name}_weight", float, field(default=t.default_weight, metadata={"help": t.help}))
             for t in LOSS_REGISTRY.values() if f"{t.name}_weight" not in have]
    if not extra:
        return LossArguments
    return dataclasses.make_dataclass("LossArguments", extra, bases=(LossArguments,))


def _number(flag: str, value, *, strict: bool = False, maximum: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value > 0 if strict else value >= 0) and (maximum is None or value <= maximum)
    if not ok:
        bound = "> 0" if strict else ">= 0"
        raise UserError(f"{flag} must be a finite number {bound}{f' and <= {maximum}' if maximum is not None else ''}"
                        f", got {value!r}")


def validate_loss_args(loss_args) -> None:
    """Every registered term's weight (a finite number >= 0, at least one above 0) and own options, and the teacher
    cache folder."""
    for t in LOSS_REGISTRY.values():
        _number(t.flag, weight(loss_args, t))
    if not active_terms(loss_args):
        raise UserError(f"every loss weight is 0 ({', '.join(t.flag for t in LOSS_REGISTRY.values())}); give at "
                        "least one a positive weight")
    for t in LOSS_REGISTRY.values():
        if t.check is not None:
            t.check(loss_args)
    cache = getattr(loss_args, "teacher_cache", None)
    if cache is not None:
        if not Path(cache).is_dir():
            raise FileNotFoundError(f"--teacher_cache {cache} is not a folder; write one with `bitdistill cache-teacher`")
        live = [t for t, _ in active_terms(loss_args) if t.teacher_outputs - {"logits"}]
        if live:
            raise UserError(f"--teacher_cache replaces the teacher's logits only; the {', '.join(t.name for t in live)} "
                            f"loss needs the live teacher (pass {' '.join(t.flag + ' 0' for t in live)}: `bitdistill "
                            "distill` turns hidden and attention on by default; or drop --teacher_cache)")


# the built-in terms (LOSS_TERMS order)

def _ce(x: LossInputs, a) -> torch.Tensor:
    return cross_entropy_loss(x.logits, x.labels, x.num_items)


def _logits(x: LossInputs, a) -> torch.Tensor:
    kw = dict(kind=a.logits_loss, temperature=a.temperature, beta=a.jsd_beta, alpha=a.skew_alpha)
    if x.cached is not None:
        ids, logp, tail = x.cached
        return cached_logits_loss(x.student_logits, ids, logp, tail, x.mask, x.num_items, **kw)
    return logits_distillation_loss(x.student_logits, x.teacher_logits, x.mask, x.num_items, **kw)


def _check_logits(a) -> None:
    _number("--temperature", a.temperature, strict=True)
    _number("--jsd_beta", a.jsd_beta, maximum=1.0)
    _number("--skew_alpha", a.skew_alpha, maximum=1.0)


def _hidden(x: LossInputs, a) -> torch.Tensor:
    return hidden_state_loss(x.student_hidden, x.teacher_hidden, x.layer_map, x.mask, x.num_items, kind=a.hidden_loss,
                             projectors=x.projectors)


def _attention(x: LossInputs, a) -> torch.Tensor:
    return attention_relation_loss(x.student_qkv, x.teacher_qkv, x.mask, x.num_items,
                                   num_relation_heads=a.attention_relation_heads, key_mask=x.key_mask)


def _check_attention(a) -> None:
    if isinstance(a.attention_relation_heads, bool) or not isinstance(a.attention_relation_heads, int) or \
            a.attention_relation_heads < 1:
        raise UserError(f"--attention_relation_heads must be a whole number >= 1, got {a.attention_relation_heads!r}")


_HELP = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(LossArguments)}
_BUILT_IN = (
    LossTerm("ce", _ce, lambda a: "cross-entropy on the next token", _HELP["ce_weight"],
             teacher_outputs=frozenset()),
    LossTerm("logits", _logits, lambda a: f"{a.logits_loss} between the teacher's and the student's next-token "
             f"distributions (temperature {a.temperature:g}{', from a top-k teacher cache' if a.teacher_cache else ''})",
             _HELP["logits_weight"], default_weight=1.0, check=_check_logits),
    LossTerm("hidden", _hidden, lambda a: f"{a.hidden_loss} between hidden states (layer map {a.hidden_layer_map})",
             _HELP["hidden_weight"], teacher_outputs=frozenset({"hidden_states"}),
             student_outputs=frozenset({"hidden_states"})),
    LossTerm("attention", _attention, lambda a: f"MiniLMv2 Q/K/V attention-relation KL (student blocks "
             f"{a.attention_layers})", _HELP["attention_weight"], teacher_outputs=frozenset({"qkv"}),
             student_outputs=frozenset({"qkv"}), check=_check_attention),
)
for _term in _BUILT_IN:
    register_loss_term(_term)
