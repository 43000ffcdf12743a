"""The held-out curve of a staged run: held-out perplexity against the budget's CPU minutes, measured every tenth of
the budget inside the KD stages (and at each stage's end), and the CPU minutes at which it first reached a target;
and the KD stages' resume points, checkpoints asked for at fractions of the budget.

The held-out split is the tuning split of ``bitdistill recover`` (``--held_out_tokens`` at the end of the training
text, which no stage trains on). Its evaluations run through :meth:`bitdistill.budget.CpuClock.excluding`, so they
are not counted in the budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from bitdistill.budget import CpuClock

__all__ = ["BudgetMarks", "HeldOutCurveCallback", "ResumePointCallback", "cpu_min_to_ppl", "held_out_loss",
           "tenth_marks"]

EVAL_BATCH = 8  # held-out blocks per forward: larger GEMMs than one block at a time, and 8 x 256 logits of a
# 49k vocabulary (400 MB in float32) stay small next to the training step's


@torch.no_grad()
def held_out_loss(model: nn.Module, blocks: torch.Tensor, batch: int = EVAL_BATCH) -> float:
    """Mean next-token cross-entropy of ``model`` over ``blocks [N, S]`` (each block predicts its last S - 1 tokens),
    ``batch`` blocks per forward (the same value as one block at a time, up to float rounding)."""
    was = model.training
    model.eval()
    total = 0.0
    try:
        for rows in blocks.split(batch):
            logits = model(input_ids=rows).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                                       reduction="sum").item()
    finally:
        model.train(was)
    return total / (blocks.shape[0] * (blocks.shape[1] - 1))


def tenth_marks(budget_s: float) -> list[float]:
    """The CPU seconds ``k / 10`` of a budget (``k = 1..9``) at which a run evaluates its held-out split; the
    budget's end is a stage's end, evaluated there."""
    return [budget_s * k / 10 for k in range(1, 10)]


def cpu_min_to_ppl(points: Sequence[Sequence[float]], threshold: float) -> float | None:
    """The CPU minutes at which a held-out curve first reached perplexity ``<= threshold`` (``None``: never).

    ``points``: ``(cpu_min, perplexity)`` pairs in increasing ``cpu_min``. Between the last point above the threshold
    and the first one at or below it, the loss (log-perplexity) is taken as linear in CPU time; a curve that starts
    at or below the threshold reached it at its first point.
    """
    prev = None
    for cpu, ppl in points:
        if ppl <= threshold:
            if prev is None:
                return float(cpu)
            (c0, p0), target = prev, math.log(threshold)
            return c0 + (cpu - c0) * (math.log(p0) - target) / (math.log(p0) - math.log(ppl))
        prev = (cpu, ppl)
    return None


class BudgetMarks:
    """Which step ends of a staged run's KD stage pass ``marks`` (CPU seconds of the run's budget).

    ``base_s`` is the run's budgeted CPU seconds when the stage's training loop begins (for a resumed stage: when it
    began plus what its loop had used before the checkpoint); inside the loop the budget counts from the loop's start
    (:class:`~bitdistill.budget.CpuBudgetCallback` on the same ``clock``), so the run's CPU time at a step is
    ``base_s`` plus what the loop has used. Marks at or before ``base_s`` are skipped.
    """

    def __init__(self, clock: CpuClock, base_s: float, marks: Sequence[float]) -> None:
        self.clock = clock
        self.base_s = base_s
        self.marks = sorted(m for m in marks if m > base_s)
        self._begin = 0.0

    def begin(self) -> None:
        """Call when the training loop begins."""
        self._begin = self.clock.used()

    def passed(self, control) -> float | None:
        """At a step end: the run's CPU seconds if the step passed one or more marks (one answer for several), else
        ``None``; also ``None`` when the step ends the training (the stage's end is handled by the stage)."""
        used = self.base_s + self.clock.used() - self._begin
        if not self.marks or used < self.marks[0] or control.should_training_stop:
            return None
        self.marks = [m for m in self.marks if m > used]
        return used


class HeldOutCurveCallback(TrainerCallback):
    """Evaluates the held-out blocks when a KD stage's training passes the next of ``marks`` (:class:`BudgetMarks`),
    outside the budget (``clock``), and keeps ``points``: ``[cpu_min, held_out_ppl]`` pairs (``points`` given: a
    resumed stage's earlier ones, continued)."""

    def __init__(self, held: torch.Tensor, clock: CpuClock, base_s: float, marks: Sequence[float],
                 log: Callable[[str], None] = print, points: Sequence[Sequence[float]] = ()) -> None:
        self.at = BudgetMarks(clock, base_s, marks)
        self.held = held
        self.log = log
        self.points: list[list[float]] = [list(p) for p in points]

    def on_train_begin(self, args, state, control, **kwargs):
        self.at.begin()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if (used := self.at.passed(control)) is None:
            return
        ppl = math.exp(self.at.clock.excluding(lambda: held_out_loss(model, self.held)))
        self.points.append([used / 60, ppl])
        self.log(f"held-out perplexity {ppl:.2f} at {used / 60:.1f} CPU-min (step {state.global_step})")


class ResumePointCallback(TrainerCallback):
    """Asks the trainer for a checkpoint (a resume point of the stage) when the training passes the next of
    ``marks`` (:class:`BudgetMarks`); the CPU time from that step's end to the checkpoint written is not counted
    (``clock``)."""

    def __init__(self, clock: CpuClock, base_s: float, marks: Sequence[float]) -> None:
        self.at = BudgetMarks(clock, base_s, marks)
        self._asked: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.at.begin()

    def on_step_end(self, args, state, control, **kwargs):
        if self.at.passed(control) is not None:
            control.should_save = True
            self._asked = time.process_time()

    def on_save(self, args, state, control, **kwargs):
        if self._asked is not None:
            self.at.clock.excluded += time.process_time() - self._asked
            self._asked = None
