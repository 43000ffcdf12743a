"""Joint local reconstruction: every decoder block of a student trained at once against the teacher's block.

Block-wise reconstruction one block at a time (:mod:`bitdistill.recover.blockwise`) gives each block
``budget / n_blocks`` of the CPU: at 10 CPU-minutes that is a handful of Adam steps per block of
SmolLM2-135M, too few to move it. Here every step trains **all** blocks on one micro-batch, each on its own
local target, so every block gets as many optimizer steps as end-to-end KD would take, at a lower cost per
step (no output head, no vocabulary-wide loss). For a micro-batch with teacher hidden states
``X_0 .. X_L`` (``X_{i+1} = teacher_block_i(X_i)``)::

    loss = (1 / L) * sum_i  block_loss(student_block_i(Z_i), X_{i+1})
    Z_i  = X_i                        (inputs="teacher": each block learns the teacher's map)
    Z_i  = stop_grad(student_block_{i-1}(Z_{i-1})), Z_0 = X_0   (inputs="student": on the inputs it will see)

``block_loss`` is one of :data:`bitdistill.recover.blockwise.BLOCK_LOSSES` (default ``token``: per-token
squared error over the token's squared target norm, so a few massive-activation positions cannot dominate).
Gradients never cross blocks, so the blocks are independent problems solved in one pass. Only the decoder
blocks' parameters train (latent weights through the straight-through estimator, norms, biases); the
learning rate warms up for ``warmup`` steps, then decays linearly to 0 at the step the CPU budget is planned
to end (planned from the measured CPU time of the steps so far and refit as it drifts:
:class:`~bitdistill.budget.StepPlan`, in the shared loop :func:`~bitdistill.recover.loop.adam_loop`). With ``bf16`` the teacher's and the student's block forwards
of a training step run under ``torch.autocast(bfloat16)`` on the student's device (the loss and the held-out
reports stay float32).

With a ``work_dir`` the stage writes a resume point (:data:`RESUME_FILE`: the blocks' parameters, Adam's moments,
the step, the plan, the CPU time, the batch order) at given CPU marks, and a later call with the same options and
text continues from it, ending where an uninterrupted stage would have.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bitdistill.budget import CpuClock
from bitdistill.errors import UserError
from bitdistill.nn.arch import decoder_layers
from bitdistill.recover.blockwise import BLOCK_LOSSES, _save_atomic, block_loss
from bitdistill.recover.layers import capture_layer_call, layer_output
from bitdistill.recover.loop import LoopResult, adam_loop

__all__ = ["JOINT_INPUTS", "RESUME_FILE", "JointConfig", "JointReport", "reconstruct_jointly_in_place"]

JOINT_INPUTS = ("teacher", "student")
RESUME_FILE = "joint_resume.pt"  # the joint stage's last resume point in its work_dir


@dataclass(frozen=True)
class JointConfig:
    """Options of :func:`reconstruct_jointly_in_place`.

    Attributes:
        lr: Adam peak learning rate (3e-3: the best of 3e-4 to 1e-2 on held-out blocks after the e2e stage for a
            long block stage; docs/distill.md#why-the-defaults).
        warmup: linear warm-up steps.
        micro_batch: sequences per step.
        loss: block loss (see :func:`bitdistill.recover.blockwise.block_loss`).
        inputs: ``teacher`` or ``student`` block inputs (see the module docstring).
        seed: seed of the batch order.
        bf16: run the training steps' block forwards under bfloat16 autocast (a different computation, and not
            faster where the block stage's BitLinear forwards already use the int8 GEMM).
    """

    lr: float = 3e-3
    warmup: int = 5
    micro_batch: int = 1
    loss: str = "token"
    inputs: str = "teacher"
    seed: int = 0
    bf16: bool = False

    def check(self) -> None:
        if self.loss not in BLOCK_LOSSES:
            raise UserError(f"unknown block loss {self.loss!r}; choose one of {', '.join(BLOCK_LOSSES)}")
        if self.inputs not in JOINT_INPUTS:
            raise UserError(f"unknown block inputs {self.inputs!r}; choose one of {', '.join(JOINT_INPUTS)}")
        if self.micro_batch < 1 or self.lr <= 0 or self.warmup < 0:
            raise UserError("joint reconstruction needs micro_batch >= 1, lr > 0 and warmup >= 0")


@dataclass
class JointReport:
    """``steps`` taken (``planned_steps`` from the CPU budget), ``losses`` (mean block loss per step),
    ``val_before`` / ``val_after`` (mean block loss on the held-out blocks, teacher inputs), ``val_history``
    (``(step, that loss)`` every ``eval_every`` steps), ``cpu_s`` (of the training steps, those before a resume
    included), ``resumed_cpu_s`` (the training CPU seconds a resumed stage had done before, in an earlier process)."""

    steps: int = 0
    planned_steps: int = 0
    losses: list[float] = field(default_factory=list)
    val_before: float = float("nan")
    val_after: float = float("nan")
    val_history: list[tuple[int, float]] = field(default_factory=list)
    cpu_s: float = 0.0
    resumed_cpu_s: float = 0.0


def _teacher_states(teacher_layers: nn.ModuleList, teacher: nn.Module, ids: torch.Tensor):
    with torch.no_grad():
        x, call = capture_layer_call(teacher, ids)
        states = [x]
        for layer in teacher_layers:
            states.append(layer_output(layer, states[-1], call))
    return states, call


def _local_loss(student_layers: nn.ModuleList, states: list[torch.Tensor], call, cfg: JointConfig) -> torch.Tensor:
    total = 0.0
    z = states[0]
    for i, layer in enumerate(student_layers):
        inp = states[i] if cfg.inputs == "teacher" else z.detach()
        z = layer_output(layer, inp, call)
        total = total + block_loss(cfg.loss, z, states[i + 1], states[i])
    return total / len(student_layers)


def _held_out(student_layers, teacher_layers, teacher, val_ids, cfg: JointConfig) -> float:
    if val_ids is None:
        return float("nan")
    teacher_cfg = JointConfig(**{**cfg.__dict__, "inputs": "teacher"})
    with torch.no_grad():
        losses = []
        for i in range(0, val_ids.shape[0], cfg.micro_batch):
            states, call = _teacher_states(teacher_layers, teacher, val_ids[i:i + cfg.micro_batch])
            losses.append(_local_loss(student_layers, states, call, teacher_cfg).item())
    return sum(losses) / len(losses)


def _train(s_layers, t_layers, teacher, input_ids, cfg: JointConfig, params, budget_cpu_s, steps, clock: CpuClock,
           report: JointReport, log, evaluate: Callable[[int], None] | None, eval_every: int,
           resume: dict | None, save: Callable[[dict], None] | None, save_marks: Sequence[float]) -> LoopResult:
    """The Adam steps (:func:`~bitdistill.recover.loop.adam_loop`): warm-up, then linear decay to the planned end.
    ``save`` gets the loop's state with the batch order's (``generator``, ``order``) at ``save_marks``; ``resume``
    is such a state to continue from."""
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    if resume is not None:
        gen.set_state(resume["generator"])
        order = list(resume["order"])
    device_type = params[0].device.type

    def step_loss(step: int) -> torch.Tensor:
        nonlocal order
        while len(order) < cfg.micro_batch:
            order += torch.randperm(input_ids.shape[0], generator=gen).tolist()
        batch, order = input_ids[order[:cfg.micro_batch]], order[cfg.micro_batch:]
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
            states, call = _teacher_states(t_layers, teacher, batch)
            return _local_loss(s_layers, states, call, cfg)

    def schedule(step: int, planned: int) -> float:
        return min((step + 1) / (cfg.warmup + 1), max(0.0, (planned - step) / max(1, planned - cfg.warmup)))

    def on_step(step: int, planned: int, loss: torch.Tensor, _cpu_s: float) -> None:
        report.losses.append(loss.item())
        if log is not None and step % 10 == 0:
            log(f"joint reconstruction step {step}/{planned if planned < sys.maxsize else '?'}: loss {loss.item():.4f}")

    def save_loop(state: dict) -> None:
        save({**state, "generator": gen.get_state(), "order": list(order)})

    return adam_loop(params, cfg.lr, step_loss, schedule, steps=steps, budget_s=budget_cpu_s, clock=clock,
                     on_step=on_step, evaluate=evaluate, eval_every=eval_every,
                     save=save_loop if save is not None else None, save_marks=save_marks, resume=resume)


def _run_key(cfg: JointConfig, steps: int | None, input_ids: torch.Tensor, s_layers: nn.ModuleList) -> dict:
    """What a resume point must have been written with: the options, the text and the blocks' parameter shapes."""
    return {"config": dataclasses.asdict(cfg), "steps": steps, "ids": [list(input_ids.shape), int(input_ids.sum())],
            "params": {k: list(v.shape) for k, v in s_layers.state_dict().items()}}


def _load_resume(path: Path, key: dict, s_layers: nn.ModuleList) -> dict:
    """The resume point at ``path`` (its parameters loaded into ``s_layers``), checked against ``key``.

    Raises:
        UserError: written with other options or text, or holding non-finite parameters.
    """
    saved = torch.load(path, weights_only=True)
    if saved.get("key") != key:
        raise UserError(f"{path} is a joint block stage of other options or text; remove it (or its folder) to train "
                        "the stage again")
    bad = [k for k, v in saved["params"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{path} holds non-finite parameters ({bad[0]}); remove it to train the stage again")
    s_layers.load_state_dict(saved["params"])
    return saved


def reconstruct_jointly_in_place(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    cfg: JointConfig | None = None,
    *,
    budget_cpu_s: float | None = None,
    steps: int | None = None,
    val_ids: torch.Tensor | None = None,
    log: Callable[[str], None] | None = None,
    eval_every: int = 0,
    work_dir: Path | None = None,
    save_marks: Sequence[float] = (),
) -> JointReport:
    """Train every decoder block of ``student`` against ``teacher``'s, all at once (see the module docstring).

    Args:
        student: a BitNet student of the teacher's architecture and depth (e.g. a converted copy of it);
            its decoder blocks are modified in place, nothing else.
        teacher: the full-precision teacher (not modified).
        input_ids: ``[N, S]`` training token blocks, visited in a seeded random order (repeated if needed).
        cfg: options (default :class:`JointConfig`).
        budget_cpu_s: process CPU seconds for the training steps (the schedule is planned to end there; the
            held-out reports are not counted), or
        steps: a fixed number of steps (exactly one of the two).
        val_ids: ``[V, S]`` held-out blocks for ``val_before`` / ``val_after``.
        log: called with a line every 10 steps and at the end.
        eval_every: with ``val_ids``, the held-out block loss every this many steps too (0: only before and
            after), in ``JointReport.val_history``; its CPU time is not counted in the budget.
        work_dir: where the stage's resume point (:data:`RESUME_FILE`) is written at ``save_marks`` (CPU seconds
            of the stage's training steps), and read: a call that finds one continues from it (with the budget it
            was written with) and reports the CPU seconds done before in ``JointReport.resumed_cpu_s``.

    Returns:
        A :class:`JointReport`.
    """
    cfg = cfg or JointConfig()
    cfg.check()
    if (budget_cpu_s is None) == (steps is None):
        raise UserError("give joint reconstruction either a CPU budget or a number of steps")
    if input_ids.dim() != 2 or input_ids.shape[0] < cfg.micro_batch:
        raise UserError(f"joint reconstruction needs [N, S] token blocks with N >= micro_batch {cfg.micro_batch}, "
                         f"got {tuple(input_ids.shape)}")
    _, s_layers = decoder_layers(student)
    _, t_layers = decoder_layers(teacher)
    if len(s_layers) != len(t_layers):
        raise UserError(f"student and teacher have {len(s_layers)} and {len(t_layers)} decoder blocks; joint "
                         "reconstruction needs a student of the teacher's depth")
    report = JointReport()
    was = student.training
    student.eval()  # no dropout: the targets are deterministic
    key = _run_key(cfg, steps, input_ids, s_layers)
    path = Path(work_dir) / RESUME_FILE if work_dir is not None else None
    resume = _load_resume(path, key, s_layers) if path is not None and path.is_file() else None
    if resume is None:
        report.val_before = _held_out(s_layers, t_layers, teacher, val_ids, cfg)
    else:
        budget_cpu_s = resume["budget_s"] if budget_cpu_s is not None else None
        report.val_before, report.losses = resume["val_before"], list(resume["losses"])
        report.val_history = [tuple(v) for v in resume["val_history"]]
        report.resumed_cpu_s = resume["loop"]["used_s"]
        if log is not None:
            log(f"joint reconstruction resumes from {path} at step {resume['loop']['step']}")

    def save(loop: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic({"key": key, "budget_s": budget_cpu_s, "loop": loop, "params": s_layers.state_dict(),
                      "losses": report.losses, "val_before": report.val_before, "val_history": report.val_history},
                     path)

    def evaluate(step: int) -> None:
        report.val_history.append((step, _held_out(s_layers, t_layers, teacher, val_ids, cfg)))

    clock = CpuClock()  # the held-out reports are not part of the budget
    params = [p for p in s_layers.parameters() if p.is_floating_point()]
    done = _train(s_layers, t_layers, teacher, input_ids, cfg, params, budget_cpu_s, steps, clock, report, log,
                  evaluate if val_ids is not None else None, eval_every, resume["loop"] if resume else None,
                  save if path is not None else None, save_marks)
    report.steps, report.planned_steps, report.cpu_s = done.steps, done.planned, done.cpu_s
    step = done.steps
    report.val_after = _held_out(s_layers, t_layers, teacher, val_ids, cfg)
    student.train(was)
    if log is not None:
        log(f"joint reconstruction: {step} steps, held-out block loss {report.val_before:.4f} -> "
            f"{report.val_after:.4f}, CPU {report.cpu_s / 60:.1f} min")
    if not math.isfinite(report.val_after) and val_ids is not None:
        raise FloatingPointError("joint reconstruction diverged (non-finite held-out loss); lower --block_lr")
    return report
