"""The Adam loop of recover's block stages (:mod:`~bitdistill.recover.blockwise`, :mod:`~bitdistill.recover.joint`).

:func:`adam_loop` takes the optimizer steps of a stage: the learning rate of each step from the stage's schedule,
the step's loss from the stage (which draws its own batch), a fixed number of steps or a process-CPU budget (the
steps it buys planned and refit by :class:`~bitdistill.budget.StepPlan`), an optional held-out evaluation every
``eval_every`` steps whose CPU time the budget does not count (:class:`~bitdistill.budget.CpuClock`), and optional
resume points: the loop's state at CPU marks, handed to the caller to save, and continued from in a later process.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bitdistill.budget import CpuClock, StepPlan

__all__ = ["LoopResult", "adam_loop"]


@dataclass(frozen=True)
class LoopResult:
    """``steps`` taken, ``planned`` (the fixed count, or the budget's last plan; ``steps`` when it never planned),
    ``cpu_s`` (process CPU seconds of the steps, evaluations excluded)."""

    steps: int
    planned: int
    cpu_s: float


def adam_loop(params: list[torch.Tensor], lr: float, step_loss: Callable[[int], torch.Tensor],
              schedule: Callable[[int, int], float], *, steps: int | None = None, budget_s: float | None = None,
              clock: CpuClock | None = None, on_step: Callable[[int, int, torch.Tensor, float], None] | None = None,
              evaluate: Callable[[int], None] | None = None, eval_every: int = 0,
              save: Callable[[dict], None] | None = None, save_marks: Sequence[float] = (),
              resume: dict | None = None) -> LoopResult:
    """Adam on ``params`` (trained with ``requires_grad`` set for the loop, restored after).

    Args:
        params: the tensors trained.
        lr: the peak learning rate; step ``k`` (0-based) runs at ``lr * schedule(k, planned)``, ``planned`` the
            steps planned at that point (a budget's plan changes as it is refit).
        step_loss: ``k -> scalar loss`` of step ``k`` (the stage draws its batch and runs its forward here).
        steps: a fixed number of steps, or
        budget_s: process CPU seconds on ``clock`` (default: one started now): no step starts once they are spent,
            and the plan is made from the measured step cost (exactly one of the two).
        on_step: ``(k + 1, planned, loss, step CPU seconds)`` after each step.
        evaluate: ``k + 1 -> None`` after every ``eval_every`` steps (0: never), its CPU time not counted.
        save: called, its CPU time not counted, with the loop's state (``step``, ``planned``, ``plan``, ``used_s``:
            the clock's CPU seconds, ``optimizer``: Adam's state dict) after the first step at or past each of
            ``save_marks`` (CPU seconds on ``clock``); the caller saves it with what it needs to continue.
        resume: such a state: the loop continues from it (the step, the plan, Adam's moments, and ``clock`` set to
            read ``used_s``), so it ends where an uninterrupted loop would have; the caller restores ``params``.
    """
    if (steps is None) == (budget_s is None):
        raise ValueError("adam_loop takes either a number of steps or a CPU budget")
    clock = clock or CpuClock()
    planned = steps if steps is not None else sys.maxsize
    plan = StepPlan(budget_s) if budget_s is not None else None
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    # torch's fused Adam: one pass over each tensor where the foreach one makes a dozen (on SmolLM2's 106M block
    # parameters on 2 CPU threads: 0.10 against 0.28-0.48 CPU seconds a step, a fifth to a third of a block step)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    opt = torch.optim.Adam(params, lr=lr, fused=fused)
    step = 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        step, planned = resume["step"], resume["planned"]
        if plan is not None:
            plan.load_state(resume["plan"])
        clock.excluded += clock.used() - resume["used_s"]
    marks = sorted(m for m in save_marks if m > clock.used())
    try:
        while step < planned and (budget_s is None or clock.used() < budget_s):
            t0 = time.process_time()
            for group in opt.param_groups:
                group["lr"] = lr * schedule(step, planned)
            loss = step_loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if plan is not None and (refit := plan.update(step, clock.used())) is not None:
                planned = refit
            if on_step is not None:
                on_step(step, planned, loss, time.process_time() - t0)
            if evaluate is not None and eval_every > 0 and step % eval_every == 0:
                clock.excluding(functools.partial(evaluate, step))
            if save is not None and marks and (used := clock.used()) >= marks[0]:
                marks = [m for m in marks if m > used]
                state = {"step": step, "planned": planned, "plan": plan.state() if plan is not None else None,
                         "used_s": used, "optimizer": opt.state_dict()}
                clock.excluding(functools.partial(save, state))
    finally:
        for p, w in zip(params, was, strict=True):
            p.requires_grad_(w)
    return LoopResult(step, planned if planned != sys.maxsize else step, clock.used())
