"""Process CPU-time budgets: parsing ``90m``-style values, the clock, planning the steps a budget buys, and
stopping a ``transformers.Trainer`` when spent, with a progress bar that shows the plan.

Budgets are in **process CPU time** (user + system of all threads, ``time.process_time()``), so other jobs on
a shared machine do not change how much work a budget buys (they only change how long it takes). Every budgeted
loop reads this module: ``bitdistill distill --time_budget`` and ``self-distill --time_budget``, each stage of ``bitdistill recover`` (its joint
block stage plans with :class:`StepPlan`; its e2e and context stages run the engine with a
:class:`CpuBudgetCallback`) and the recipe's overall :class:`CpuClock`.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from bitdistill.errors import UserError
from bitdistill.weights import read_json

__all__ = ["BUDGET_STATE_FILE", "BudgetProgressCallback", "CpuBudgetCallback", "CpuClock", "StepPlan", "parse_cpu_budget",
           "resumed_budget_state", "run_budget"]

logger = logging.getLogger(__name__)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
BUDGET_STATE_FILE = "cpu_budget.json"  # in every checkpoint of a budgeted run: CpuBudgetCallback.state()


def parse_cpu_budget(text: str | float | int) -> float:
    """``"90m"``, ``"1.5h"``, ``"600s"`` or a number of seconds -> seconds (> 0).

    Raises:
        ValueError: anything else (one line, with the accepted forms).
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
        if m is None:
            raise UserError(f"--time_budget {text!r} is not a CPU time; write e.g. 90m, 1.5h, 600s or 600")
        value = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if value <= 0:
        raise UserError(f"--time_budget must be positive, got {text!r}")
    return value


def run_budget(time_budget: str | float | None, training_args) -> float | None:
    """The CPU seconds of a trainer run's ``--time_budget`` (``None``: no budget), checked against its
    ``transformers.TrainingArguments``: a budget plans the steps itself (no ``--max_steps``). A budgeted run
    resumes with the CPU time and plan its checkpoint recorded (:data:`BUDGET_STATE_FILE`). One-line
    :class:`UserError` otherwise."""
    if time_budget is None:
        return None
    budget_s = parse_cpu_budget(time_budget)
    if training_args.max_steps > 0:
        raise UserError("--time_budget plans the steps itself; drop --max_steps (or the budget)")
    return budget_s


def resumed_budget_state(checkpoint: Path | None, budget_s: float | None) -> dict | None:
    """The CPU budget state (:meth:`CpuBudgetCallback.state`) that ``checkpoint`` recorded, for a run with a budget of
    ``budget_s`` CPU seconds resuming it (``None``: a new run, or no budget on either side).

    Raises:
        UserError: the checkpoint's run had another budget, or a budget while this one has none (or the reverse).
    """
    if checkpoint is None:
        return None
    path = Path(checkpoint) / BUDGET_STATE_FILE
    state = read_json(path, "resume from another checkpoint or start a new --output_dir") if path.is_file() else None
    saved = state["budget_s"] if state else None
    if saved != budget_s:
        was = f"--time_budget {saved:g}s" if saved else "no --time_budget"
        now = f"--time_budget {budget_s:g}s" if budget_s else "none"
        raise UserError(f"{checkpoint} was written by a run with {was}, this one has {now}; resume with the same "
                        "budget or start a new --output_dir")
    return state


class StepPlan:
    """How many optimizer steps a CPU budget buys, planned from the measured step cost and refit as it drifts.

    The CPU time of steps ``measure_from``..``measure_to`` gives the first plan. A step's cost drifts over a run
    (the first steps are cheaper than the average one, and another job starting on the machine changes the cost
    of every step after it), so the plan is refit ``refits`` more times, each after another ``1 / (refits + 1)``
    of the first plan, from the mean cost of all steps since ``measure_from``; a plan made once would end the
    budget with the learning rate still high, or end the schedule with budget left.

    Attributes:
        planned_steps: the current plan (``None`` before ``measure_to``).
    """

    def __init__(self, budget_s: float, *, measure_from: int = 1, measure_to: int = 3, refits: int = 9) -> None:
        if not 0 <= measure_from < measure_to:
            raise ValueError(f"need 0 <= measure_from < measure_to, got {measure_from}, {measure_to}")
        self.budget_s = budget_s
        self.measure = (measure_from, measure_to)
        self.refits = refits
        self.planned_steps: int | None = None
        self._mark = 0.0
        self._first_plan = 0
        self._next_refit = -1

    def state(self) -> dict:
        """What :meth:`load_state` needs to continue the plan in a resumed run (JSON-serializable)."""
        return {"planned_steps": self.planned_steps, "mark": self._mark, "first_plan": self._first_plan,
                "next_refit": self._next_refit}

    def load_state(self, state: dict) -> None:
        """Continue the plan :meth:`state` recorded."""
        self.planned_steps = state["planned_steps"]
        self._mark, self._first_plan, self._next_refit = state["mark"], state["first_plan"], state["next_refit"]

    def update(self, step: int, used_s: float) -> int | None:
        """Call after optimizer step ``step`` (1-based) with the CPU seconds used so far; returns the new
        planned total when the plan was (re)made at this step, else ``None``."""
        if step == self.measure[0]:
            self._mark = used_s
            return None
        if step not in (self.measure[1], self._next_refit):  # _next_refit is -1 until the first plan
            return None
        per_step = (used_s - self._mark) / (step - self.measure[0])
        self.planned_steps = step + max(1, int((self.budget_s - used_s) / max(per_step, 1e-9)))
        if step == self.measure[1]:
            self._first_plan = self.planned_steps
        every = max(1, self._first_plan // (self.refits + 1))
        self._next_refit = step + every if step + every < self.planned_steps else -1
        return self.planned_steps


class CpuClock:
    """Process CPU seconds since it was made, minus the spans run through :meth:`excluding` (reporting evaluations,
    saving resume points) and the seconds added to ``excluded``."""

    def __init__(self) -> None:
        self.start = time.process_time()
        self.excluded = 0.0

    def used(self) -> float:
        return time.process_time() - self.start - self.excluded

    def excluding(self, fn: Callable[[], object]):
        """``fn()``, its CPU time not counted."""
        t = time.process_time()
        try:
            return fn()
        finally:
            self.excluded += time.process_time() - t


class CpuBudgetCallback(TrainerCallback):
    """Stops training once the process has used ``budget_s`` CPU seconds since training began.

    With ``fit_schedule`` the learning-rate schedule is fit to the budget: the schedule's ``num_training_steps``
    (linear, cosine, ... from transformers' ``get_scheduler``) and ``state.max_steps`` become the number of steps
    the budget buys, as a :class:`StepPlan` measures and refits it, so the learning rate decays to its end when
    the budget is spent. Each (re)plan is logged, and every training log line gains ``planned_steps`` and
    ``cpu_s_left``. The trainer that runs it must not stop on its own before the budget is spent (see
    :meth:`bitdistill.runs.RunTrainer.set_initial_training_values`).

    With ``clock``, the budget is that clock's CPU time since training began, so what a caller runs inside the
    loop through ``clock.excluding`` (held-out evaluations) is not counted; without, a clock of its own.

    A resumed run continues where a checkpoint left off: :meth:`state` (the CPU seconds used and the plan at the
    end of the last step) goes into every checkpoint, and :meth:`load_state` before training makes the resumed run
    count on from there and refit its schedule to the same plan (the CPU spent after that checkpoint by the
    interrupted run is not counted).

    Attributes:
        used_s: CPU seconds used when training ended (those before a resume included); ``steps`` the optimizer
            steps done; ``planned_steps`` the refit step count (or ``None``).
    """

    def __init__(self, budget_s: float, *, fit_schedule: bool = True, measure_from: int = 1, measure_to: int = 3,
                 refits: int = 9, clock: CpuClock | None = None) -> None:
        self.budget_s = budget_s
        self.fit_schedule = fit_schedule
        self.plan = StepPlan(budget_s, measure_from=measure_from, measure_to=measure_to, refits=refits)
        self.clock = clock
        self.start = 0.0
        self.used_s = 0.0
        self.steps = 0
        self._resumed_s = 0.0
        self._state = {"budget_s": budget_s, "used_s": 0.0, "plan": self.plan.state()}

    def _used(self) -> float:
        return self.clock.used() - self.start

    @property
    def planned_steps(self) -> int | None:
        return self.plan.planned_steps

    def state(self) -> dict:
        """The budget at the end of the last step: ``{"budget_s", "used_s", "plan"}`` (JSON-serializable)."""
        return self._state

    def load_state(self, state: dict) -> None:
        """Continue a run whose checkpoint recorded ``state`` (:meth:`state`, checked by
        :func:`resumed_budget_state`); call before training."""
        self.plan.load_state(state["plan"])
        self._resumed_s = state["used_s"]
        self._state = dict(state)

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock = self.clock or CpuClock()
        self.start = self.clock.used() - self._resumed_s
        if self.fit_schedule and self.planned_steps is not None:  # a resumed plan
            _refit_schedule(kwargs.get("lr_scheduler"), self.planned_steps)
            state.max_steps = self.planned_steps

    def on_step_end(self, args, state, control, **kwargs):
        used = self._used()
        if used >= self.budget_s:
            control.should_training_stop = True
            state.max_steps = state.global_step
        elif self.fit_schedule and (planned := self.plan.update(state.global_step, used)) is not None:
            _refit_schedule(kwargs.get("lr_scheduler"), planned)
            state.max_steps = planned
            logger.info("CPU budget: %d steps planned (step %d, %.0f of %.0f CPU-s used)", planned,
                        state.global_step, used, self.budget_s)
        self._state = {"budget_s": self.budget_s, "used_s": used, "plan": self.plan.state()}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["planned_steps"] = self.planned_steps
            logs["cpu_s_left"] = round(max(self.budget_s - self._used(), 0.0), 1)

    def on_train_end(self, args, state, control, **kwargs):
        self.used_s = self._used()
        self.steps = state.global_step


class BudgetProgressCallback(ProgressCallback):
    """transformers' progress bar for a budgeted run: no total (steps and rate only) until ``budget`` has planned
    its steps, then the plan as the total, so the bar's time left is the budget's."""

    def __init__(self, budget: CpuBudgetCallback) -> None:
        super().__init__()
        self.budget = budget

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=self.budget.planned_steps, dynamic_ncols=True)
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        bar = self.training_bar
        if bar is not None and bar.total != self.budget.planned_steps:
            bar.total = self.budget.planned_steps
            bar.refresh()
        super().on_step_end(args, state, control, **kwargs)


def _refit_schedule(scheduler, total_steps: int) -> None:
    """Give a transformers ``LambdaLR`` schedule a new ``num_training_steps`` (its lambdas are ``functools.partial``)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not lambdas or not all(isinstance(f, functools.partial) and "num_training_steps" in f.keywords for f in lambdas):
        logger.warning("the learning-rate schedule cannot be refit to the CPU budget; it keeps its original length")
        return
    scheduler.lr_lambdas = [functools.partial(f.func, *f.args, **{**f.keywords, "num_training_steps": total_steps})
                            for f in lambdas]
