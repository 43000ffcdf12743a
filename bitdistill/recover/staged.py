"""The staged recovery recipe: calibrated initialization, block-wise reconstruction, end-to-end KD, in one CPU budget.

``run_staged_recovery`` (CLI: ``bitdistill recover``):

1. **init** — every converted layer gets its calibrated ternary weight (GPTQ-style rounding and a scale
   search on the layer's inputs, :mod:`bitdistill.recover.ternary`), block by block on the student's own
   inputs; no gradient steps.
2. **blocks** — each decoder block is trained to map the hidden states entering it to the teacher block's
   output, with ``block_fraction`` of the budget (stages 1 and 2 together): by default all blocks at once on
   their own local targets (``block_mode joint``, :mod:`bitdistill.recover.joint`), or one block at a time
   (``block_mode sequential``, :mod:`bitdistill.recover.blockwise`; resumable per block).
3. **e2e** — the distillation engine (:func:`~bitdistill.distill.engine.distill_student`, what ``bitdistill
   distill`` runs) on the reconstructed student, until the budget is spent, or ``1 - context_fraction`` of what is
   left of it when stage 4 runs (its learning-rate schedule fit to the budget,
   :class:`~bitdistill.budget.CpuBudgetCallback`).
4. **context** — optional context extension (``context_fraction`` above 0; off by default): the same engine
   on stage 3's student on blocks of ``context_length`` tokens (longer than ``--max_seq_length``), at
   ``context_learning_rate``, for the rest of the budget. At the same budget it measured worse than giving
   those CPU seconds to stage 3 (docs/distill.md).

One teacher is loaded and the training text is tokenized once; the student stays in memory from stage to stage
and is written to disk only as a resume point (``stage2_student``, and ``e2e/student`` when stage 4 follows)
and, at the end, as ``<output_dir>/student``. The budget is process CPU time from the moment the teacher is
loaded (:class:`~bitdistill.budget.CpuClock`); the held-out evaluations that report each stage, writing resume
points and what runs around each KD stage's training loop are not counted. After each stage its held-out loss and perplexity (on
the tuning split: the last ``held_out_tokens`` of the training text, which no stage trains on) and its CPU time are
printed, appended to ``<output_dir>/audit_log.jsonl`` (``"event": "stage"``) and, at the end, written to
``<output_dir>/recovery.json`` and the student's model card. With ``--held_out_curve true`` the split is also
evaluated at every tenth of the budget inside the KD stages (:mod:`bitdistill.recover.curve`); ``recovery.json``'s
``held_out_curve`` holds those points and the stages' ends as ``[cpu_min, held_out_ppl]`` pairs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bitdistill.audit import PROVENANCE_FILE, release_memory
from bitdistill.budget import BUDGET_STATE_FILE, CpuClock, parse_cpu_budget, resumed_budget_state
from bitdistill.checkpoints import clean_partial_checkpoints, latest_checkpoint
from bitdistill.convert import load_model
from bitdistill.data.args import DataArguments
from bitdistill.distill.args import EvalTaskArguments, LossArguments, ModelArguments
from bitdistill.distill.engine import Distilled, distill_student, save_student
from bitdistill.distill.recipe import plan_recipe
from bitdistill.distill.run import (
    METRICS_FILE,
    StudentCard,
    load_teacher,
    load_tokenizer,
    make_trainable,
    packed_and_task_metrics,
    prepare_student,
    record_subln_eps,
    resumed_subln_eps,
)
from bitdistill.distill.terms import validate_loss_args
from bitdistill.errors import UserError
from bitdistill.io import atomic_write
from bitdistill.nn.arch import decoder_layers, is_conv1d
from bitdistill.recover.blockwise import BLOCK_LOSSES, BlockwiseConfig, reconstruct_blocks_in_place
from bitdistill.recover.curve import HeldOutCurveCallback, ResumePointCallback, held_out_loss, tenth_marks
from bitdistill.recover.joint import RESUME_FILE as JOINT_RESUME_FILE
from bitdistill.recover.joint import JointConfig, reconstruct_jointly_in_place
from bitdistill.runs import build_blocks, config_changes, config_dict, eval_token_ids, tokens_per_step
from bitdistill.validate import validate_run_args
from bitdistill.weights import read_json

__all__ = ["RecoverArguments", "StageResult", "estimate_init_cpu_s", "held_out_loss", "recover_defaults",
           "run_staged_recovery"]

BLOCK_MODES = ("joint", "sequential")
STAGE_NAMES = {"init": "calibrated ternary initialization", "blocks": "block-wise reconstruction",
               "e2e": "end-to-end KD", "context": "context extension"}
RESULT_FILE = "recovery.json"
RECOVER_CONFIG_FILE = "recover_config.json"  # the options a rerun must keep to reuse finished stages
STAGE_STATE_FILE = "stage.json"  # in a KD stage's resume points: its budget, its beginning, its curve so far
LONG_BUDGET_S = 60 * 60  # from here the default block share is 0.3
JOINT_BLOCK_MICRO_BATCH = 1  # the joint block stage's default step: one sequence
JOINT_BLOCK_SEQ_LENGTH = 128  # of this many tokens (at most calibration_seq_length)
SHORT_BUDGET_S = 30 * 60  # below this the joint block stage's default learning rate is
SHORT_BLOCK_LR = 1e-2  # this one, from it JointConfig().lr (3e-3)
HELD_OUT_TOKENS = 64 * 256  # the tuning split: 4 x 256 ranked two recipes opposite to wiki.test.raw (issue 50)
CARD_PROMPTS = ("The capital of France is", "The game was released in", "In mathematics, a prime number is")
CARD_NEW_TOKENS = 24  # greedy continuations of CARD_PROMPTS by the teacher and the student in the model card
BLOCK_VAL_BLOCKS = 4  # held-out blocks of the block stage's own before/after block losses, counted in its budget

logger = logging.getLogger(__name__)


def recover_defaults() -> dict[str, object]:
    """The defaults of ``bitdistill recover`` (flags and ``--config`` keys override them): ``distill``'s
    (:data:`~bitdistill.distill.args.DISTILL_DEFAULTS`, its e2e stage's recipe), plus bfloat16 autocast in both
    training stages (``bf16`` and ``use_cpu``) on a host without CUDA whose CPU multiplies bfloat16 in hardware
    (:func:`bitdistill.host.cpu_has_bf16`): there a CPU-minute buys more steps, and the tuning-split probe at 30
    CPU-minutes in ``benchmarks/results/logs/recovery_default_bf16_at_30_04ed0d4_*.jsonl`` chose it. Elsewhere
    (emulated bfloat16, or a GPU, whose precision is the user's choice) training stays float32."""
    from bitdistill.distill.args import DISTILL_DEFAULTS
    from bitdistill.host import cpu_has_bf16

    cpu_bf16 = not torch.cuda.is_available() and cpu_has_bf16()
    return {**DISTILL_DEFAULTS, **({"bf16": True, "use_cpu": True} if cpu_bf16 else {})}


@dataclass
class RecoverArguments:
    """Options of the staged recipe (``bitdistill recover``); the e2e stage also takes every ``distill`` option."""

    time_budget: str = field(default="90m", metadata={
        "help": "Process CPU time for the whole recipe, counted from when the teacher is loaded (90m, 1.5h, 600s)."})
    block_fraction: float | None = field(default=None, metadata={
        "help": "Share of the budget for calibrated init + block-wise reconstruction; the e2e stage gets the rest "
                "(default: 0.15 below 60 CPU-minutes, 0.3 from 60, the best shares on held-out blocks at 10, 30 "
                "and 90; see docs/distill.md)."})
    block_mode: str = field(default="joint", metadata={
        "help": "joint: every block trained at once on its local target, on all the training text; sequential: "
                "one block at a time on cached states of calibration_tokens tokens (resumable per block)."})
    calibration_tokens: int = field(default=8192, metadata={
        "help": "Most tokens of the training text (the first ones) for the init stage and the sequential block "
                "stage; fewer (down to one micro-batch of blocks) when the init stage would otherwise take over "
                "half the block share."})
    calibration_seq_length: int = field(default=256, metadata={
        "help": "Sequence length of the init stage's and the sequential block stage's token blocks and of the "
                "held-out blocks."})
    block_seq_length: int | None = field(default=None, metadata={
        "help": "Sequence length of the joint block stage's training blocks (default: 128, or "
                "calibration_seq_length if shorter)."})
    held_out_tokens: int | None = field(default=None, metadata={
        "help": "The tuning split: tokens at the end of the training text (whole blocks of calibration_seq_length, "
                "rounded up), never trained on, that report each stage's held-out loss and perplexity and the "
                f"held-out curve (default {HELD_OUT_TOKENS}: 64 blocks of 256)."})
    held_out_curve: bool = field(default=False, metadata={
        "help": "Also evaluate the tuning split each time the KD stages pass another tenth of the budget, for "
                "recovery.json's held_out_curve (outside the budget: wall time only, about one stage-end "
                "evaluation each)."})
    held_out_blocks: int | None = field(default=None, metadata={
        "help": "Deprecated: --held_out_tokens N x calibration_seq_length."})
    block_init: str = field(default="keep", metadata={
        "help": "Initialization before the block stage: keep (the naive absmean copy; no init stage) or gptq "
                "(calibrated ternary rounding, stage 'init')."})
    block_steps: int | None = field(default=None, metadata={
        "help": "Adam steps per block (default: as many as the block share of the budget allows; 0: none)."})
    block_lr: float | None = field(default=None, metadata={
        "help": "Adam learning rate of the block stage (joint: warm-up then linear decay to the end of the stage; "
                "sequential: cosine per block). Default: joint 1e-2 below 30 CPU-minutes and 3e-3 from 30 (measured "
                "on held-out blocks, docs/distill.md), sequential 1e-3 (not re-measured)."})
    block_micro_batch: int | None = field(default=None, metadata={
        "help": "Sequences per block step (default: joint 1, sequential 2)."})
    block_loss: str = field(default="token", metadata={"help": f"Block loss: {', '.join(BLOCK_LOSSES)}."})
    block_student_inputs: bool = field(default=True, metadata={
        "help": "Train each block on the student's own previous-block outputs (false: the teacher's)."})
    state_memory_mb: int | None = field(default=None, metadata={
        "help": "Memory allowed for the cached hidden states (default: half the available memory)."})
    context_length: int | None = field(default=None, metadata={
        "help": "Context extension: with --context_fraction above 0, the last context_fraction of the e2e stage "
                "trains on blocks of this many tokens (stage 'context'; default: 512, or the teacher's context if "
                "shorter); 0, or not above --max_seq_length: none."})
    context_fraction: float = field(default=0.0, metadata={
        "help": "Share of the e2e stage's budget for the context stage (default 0: off; at the same budget it "
                "measured worse than more e2e steps, see docs/distill.md)."})
    context_learning_rate: float = field(default=2e-4, metadata={
        "help": "Peak learning rate of the context stage (linear decay to its end)."})
    resume_points: int = field(default=10, metadata={
        "help": "The joint block stage and the KD stages write a resume point (optimizer included) each time the "
                "run passes another 1/resume_points of the budget, outside the budget; a killed run resumes the "
                "stage from the last one, with the CPU time and step plan it recorded (0 or 1: none, the stage "
                "restarts)."})

    def resolved(self, budget_s: float) -> RecoverArguments:
        """A copy with every option left at ``None`` set to its default for a budget of ``budget_s`` CPU seconds
        (``block_fraction``, ``block_lr``, ``block_micro_batch``, ``block_seq_length``); given options are kept.

        The joint block stage takes many small steps (one sequence of 128 tokens): at every share measured on
        held-out blocks they beat fewer steps of 2 x 256 tokens, because the stage needs optimizer steps more than
        tokens a step. Its learning rate is 1e-2 below :data:`SHORT_BUDGET_S` and 3e-3 from it, as the best rate
        falls when the stage gets longer (docs/distill.md#why-the-defaults)."""
        defaults = {"block_fraction": 0.3 if budget_s >= LONG_BUDGET_S else 0.15}
        if self.block_mode == "joint":
            defaults.update(block_micro_batch=JOINT_BLOCK_MICRO_BATCH,
                            block_seq_length=min(JOINT_BLOCK_SEQ_LENGTH, self.calibration_seq_length),
                            block_lr=SHORT_BLOCK_LR if budget_s < SHORT_BUDGET_S else JointConfig().lr)
        else:
            defaults.update(block_micro_batch=2, block_lr=BlockwiseConfig().lr)
        if self.held_out_blocks is not None:
            if self.held_out_tokens is not None:
                raise UserError("--held_out_blocks and --held_out_tokens both set the held-out split; drop "
                                "--held_out_blocks")
            logger.warning("--held_out_blocks is deprecated; use --held_out_tokens %d",
                           self.held_out_blocks * self.calibration_seq_length)
        defaults["held_out_tokens"] = _held_out_count(self) * self.calibration_seq_length
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return dataclasses.replace(self, **{**defaults, **given, "held_out_blocks": None})


@dataclass
class StageResult:
    """One stage's outcome: held-out loss (mean next-token cross-entropy) and perplexity, CPU seconds used."""

    stage: str
    held_out_loss: float
    held_out_perplexity: float
    cpu_s: float
    detail: dict = field(default_factory=dict)

    def line(self) -> str:
        return (f"stage {self.stage}: held-out loss {self.held_out_loss:.4f}, perplexity {self.held_out_perplexity:.2f}, "
                f"CPU {self.cpu_s / 60:.1f} min")


def _held_out_count(recover_args: RecoverArguments) -> int:
    """Blocks of ``calibration_seq_length`` tokens in the held-out split (of resolved or unresolved options)."""
    s = recover_args.calibration_seq_length
    if recover_args.held_out_tokens is not None:
        return math.ceil(recover_args.held_out_tokens / s)
    if recover_args.held_out_blocks is not None:
        return recover_args.held_out_blocks
    return math.ceil(HELD_OUT_TOKENS / s)


def estimate_init_cpu_s(model: nn.Module, tokens: int, n_scales: int) -> float:
    """An estimate of the init stage's CPU seconds (three passes over the calibration tokens and a GPTQ rounding
    per scale and linear), used to size the calibration set and to refuse a budget too small for the init
    before any work. The rates are fit to SmolLM2-135M on 2 cores, where the estimate came out about 10% low."""
    _, layers = decoder_layers(model)
    params = sum(p.numel() for p in layers.parameters())
    gptq = sum(m.weight.numel() * min(m.weight.shape) for m in layers.modules()
               if isinstance(m, nn.Linear) or is_conv1d(m))
    if n_scales == 0:  # no calibrated rounding: one teacher pass and the student's propagation
        return 2 * 2 * params * tokens / 20e9
    return 3 * 2 * params * tokens / 20e9 + (n_scales + 1) * 2 * gptq / 10e9


def _text_blocks(recover_args: RecoverArguments, data_args: DataArguments, tokenizer) -> torch.Tensor:
    """The training text tokenized once, in blocks ``[N, S]`` of ``S = calibration_seq_length`` tokens; every stage
    cuts its own blocks from these tokens (:func:`_split`, :func:`_kd_blocks`)."""
    s = recover_args.calibration_seq_length
    return build_blocks(dataclasses.replace(data_args, max_seq_length=s, max_train_blocks=None, validation_blocks=0),
                        tokenizer)


def _split(recover_args: RecoverArguments, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(calibration [N, S], training [T, B], held_out [H, S])`` of :func:`_text_blocks`: the first
    ``calibration_tokens``, everything but the held-out blocks (cut into blocks of ``B = block_seq_length``), the
    last ``held_out_tokens`` (the tuning split); a one-line error when the text is too short. ``recover_args`` is
    resolved (:meth:`RecoverArguments.resolved`)."""
    s = recover_args.calibration_seq_length
    mb = recover_args.block_micro_batch
    n = math.ceil(recover_args.calibration_tokens / s / mb) * mb
    h = _held_out_count(recover_args)
    if blocks.shape[0] < n + h:
        raise UserError(f"the training text has {blocks.shape[0] * s} tokens in {s}-token blocks, fewer than the "
                         f"{n * s} calibration + {h * s} held-out tokens asked; give more text or lower "
                         "--calibration_tokens / --held_out_tokens")
    train = blocks[:blocks.shape[0] - h].reshape(-1)
    b = recover_args.block_seq_length or s
    if recover_args.block_mode == "joint" and train.numel() // b < mb:
        raise UserError(f"the training text before the held-out blocks has {train.numel()} tokens, fewer than one "
                         f"block step of {mb} x {b} (--block_micro_batch x --block_seq_length); give more text or "
                         "lower those")
    return blocks[:n], train[: train.numel() // b * b].reshape(-1, b), blocks[blocks.shape[0] - h:]


def _calibration(recover_args: RecoverArguments, data_args: DataArguments,
                 tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_split` of :func:`_text_blocks`: the calibration, block-stage training and held-out blocks."""
    return _split(recover_args, _text_blocks(recover_args, data_args, tokenizer))


def _kd_blocks(blocks: torch.Tensor, held: torch.Tensor, data_args: DataArguments
               ) -> tuple[torch.Tensor, DataArguments]:
    """A KD stage's training blocks ``[N, max_seq_length]``, cut from the tokens of :func:`_text_blocks`, and its
    data options: the validation blocks it holds out cover the held-out blocks (and one more), so no KD stage
    trains on the tokens that report the stages."""
    ids = blocks.reshape(-1)
    length = data_args.max_seq_length
    kd = ids[: ids.numel() // length * length].reshape(-1, length)
    if data_args.max_train_blocks is not None:
        kd = kd[: data_args.max_train_blocks]
    held_tokens = (held.shape[0] + 1) * held.shape[1]  # + 1: the two block grids' tails differ by < a block
    data = dataclasses.replace(data_args, validation_blocks=max(
        data_args.validation_blocks, math.ceil(held_tokens / length)))
    if kd.shape[0] <= data.validation_blocks:
        raise UserError(f"{kd.shape[0]} blocks of {length} tokens leave none for the KD stage after holding out "
                         f"{data.validation_blocks}; give more text")
    return kd, data


def _check_args(recover_args: RecoverArguments, model_args: ModelArguments, loss_args: LossArguments) -> float:
    budget = parse_cpu_budget(recover_args.time_budget)
    if recover_args.block_mode not in BLOCK_MODES:
        raise UserError(f"unknown --block_mode {recover_args.block_mode!r}; choose one of {', '.join(BLOCK_MODES)}")
    if recover_args.block_fraction is not None and not 0 < recover_args.block_fraction <= 1:
        raise UserError(f"--block_fraction must be in (0, 1], got {recover_args.block_fraction}")
    if (recover_args.context_length or 0) < 0 or not 0 <= recover_args.context_fraction < 1:
        raise UserError(f"--context_length must be >= 0 and --context_fraction in [0, 1), got "
                         f"{recover_args.context_length} and {recover_args.context_fraction}")
    if recover_args.resume_points < 0:
        raise UserError(f"--resume_points must be >= 0, got {recover_args.resume_points}")
    if not recover_args.context_learning_rate > 0:
        raise UserError(f"--context_learning_rate must be > 0, got {recover_args.context_learning_rate}")
    if recover_args.calibration_tokens < 1 or _held_out_count(recover_args) < 1:
        raise UserError("--calibration_tokens and --held_out_tokens (or --held_out_blocks) must be >= 1")
    if recover_args.block_seq_length is not None and recover_args.block_seq_length < 2:
        raise UserError(f"--block_seq_length must be at least 2 tokens, got {recover_args.block_seq_length}")
    if recover_args.block_seq_length is not None and recover_args.block_mode != "joint":
        raise UserError("--block_seq_length sets the joint block stage's sequences; drop it with --block_mode "
                        "sequential (its blocks are --calibration_seq_length tokens)")
    BlockwiseConfig(init=recover_args.block_init, steps=recover_args.block_steps, lr=recover_args.block_lr,
                    micro_batch=recover_args.block_micro_batch, loss=recover_args.block_loss).check()
    if model_args.student_config or model_args.quant_warmup_steps:
        raise UserError("the staged recipe starts from a converted copy of the teacher; drop --student_config "
                         "and --quant_warmup_steps")
    if loss_args.teacher_cache:
        raise UserError("the staged recipe needs the live teacher; drop --teacher_cache")
    return budget


def _append_audit(output_dir: Path, result: StageResult) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "audit_log.jsonl", "a") as f:
        f.write(json.dumps({"event": "stage", "time": time.time(), **dataclasses.asdict(result)}) + "\n")


def _atomic_json(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=1, default=str))


def _card_section(results: list[StageResult], budget: float, teacher_loss: float,
                  continuations: list[tuple[str, str, str]]) -> str:
    """The model card's section: the budget, each stage's held-out loss and perplexity beside the teacher's, and
    ``continuations`` (``(prompt, teacher's, student's)`` greedy continuations)."""
    rows = "\n".join(f"| {r.stage} | {r.held_out_loss:.4f} | {r.held_out_perplexity:.2f} | {r.cpu_s / 60:.1f} |"
                     for r in results)
    stages = ", ".join(STAGE_NAMES[r.stage] for r in results)
    ratio = (f" The student's held-out perplexity is {math.exp(results[-1].held_out_loss - teacher_loss):.2f}x its "
             "teacher's." if results else "")
    text = (f"\n\n## Staged recovery\n\nTrained with `bitdistill recover` "
            f"({stages}) in a budget of {budget / 60:.0f} CPU-minutes. Held-out: the last blocks "
            "of the training text, never trained on. CPU: cumulative process CPU time at the end of the stage."
            f"{ratio}\n\n| stage | held-out loss | held-out perplexity | CPU minutes |\n|---|---|---|---|\n"
            f"| teacher | {teacher_loss:.4f} | {math.exp(teacher_loss):.2f} | |\n" + rows + "\n")
    if continuations:
        text += (f"\n### Greedy continuations\n\n{CARD_NEW_TOKENS} new tokens, greedy, from the teacher and the "
                 "student.\n\n| prompt | teacher | student |\n|---|---|---|\n" +
                 "".join(f"| {_cell(p)} | {_cell(t)} | {_cell(s)} |\n" for p, t, s in continuations))
    return text


def _cell(text: str) -> str:
    """``text`` as one markdown table cell: one line, its pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _continuations(teacher: nn.Module, student: nn.Module, tokenizer) -> list[tuple[str, str, str]]:
    """Greedy continuations of :data:`CARD_PROMPTS` by the teacher and the student, for the model card."""
    from bitdistill.eval.generate import generate_text

    texts = [[g.text for g in generate_text(m, tokenizer, CARD_PROMPTS, max_new_tokens=CARD_NEW_TOKENS,
                                            decoder="torch")] for m in (teacher, student)]
    return list(zip(CARD_PROMPTS, *texts, strict=True))


@dataclass
class _Stage:
    """What a KD stage needs besides the models: the held-out blocks that report it, the budget's clock, the CPU
    seconds at which the held-out curve is evaluated (``marks``) and resume points are written (``resume_marks``)
    and the run's arguments (for provenance and checkpoints)."""

    teacher: nn.Module
    tokenizer: object
    blocks: torch.Tensor
    held: torch.Tensor
    clock: CpuClock
    model_args: ModelArguments
    loss_args: LossArguments
    recover_args: RecoverArguments
    command: str | None
    perplexity_ids: torch.Tensor | None  # --eval_files, tokenized once
    marks: list[float] = field(default_factory=list)
    resume_marks: list[float] = field(default_factory=list)
    log: Callable[[str], None] = print


def _kd_stage(name: str, student: nn.Module, budget_s: float, data_args: DataArguments, training_args, ctx: _Stage,
              folder: Path) -> tuple[StageResult, Distilled]:
    """One KD stage: the engine (:func:`~bitdistill.distill.engine.distill_student`) trains ``student`` in place
    from the teacher in memory on blocks of ``data_args.max_seq_length`` tokens, its schedule fit to ``budget_s``
    CPU seconds of training (what runs around the training loop is not counted); its audit log, provenance and
    resume points go to ``folder``. The held-out points of ``ctx.marks`` it passes are in the result's
    ``detail["curve"]``.

    At each of ``ctx.resume_marks`` it writes a checkpoint holding, besides the trainer's state, the stage's
    (:data:`STAGE_STATE_FILE`: its budget, the run's CPU seconds when it began, its curve so far). A stage that
    finds one in ``folder`` resumes from it: the run's clock is set back to the stage's beginning and the engine
    continues the CPU time and plan the checkpoint recorded, so the stage ends where an uninterrupted one would
    have. Without one, what a killed attempt left in ``folder`` is removed and the stage starts over."""
    blocks, data = _kd_blocks(ctx.blocks, ctx.held, data_args)
    training = copy.copy(training_args)
    training.max_steps = -1  # the budget plans the steps
    training.save_strategy = "no"  # resume points are asked for at fractions of the budget (ResumePointCallback)
    training.save_total_limit = 1
    training.output_dir = str(folder)
    clean_partial_checkpoints(folder)
    checkpoint = latest_checkpoint(folder, (STAGE_STATE_FILE, BUDGET_STATE_FILE))
    base_s, done_s, points = ctx.clock.used(), 0.0, []
    if checkpoint is None:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        fix = f"remove {folder} to train the {name} stage again"
        saved = read_json(checkpoint / STAGE_STATE_FILE, fix)
        budget_s, base_s, points = saved["budget_s"], saved["base_s"], saved["curve"]
        done_s = resumed_budget_state(checkpoint, budget_s)["used_s"]
        ctx.clock.excluded += ctx.clock.used() - base_s  # the run's clock reads what it read when the stage began
        ctx.log(f"{name} stage resumes from {checkpoint} ({done_s / 60:.1f} of its {budget_s / 60:.1f} CPU-min done)")
    config = config_dict(ctx.model_args, data, ctx.loss_args, training_args=training)
    all_args = {"model": dataclasses.asdict(ctx.model_args), "data": dataclasses.asdict(data),
                "loss": dataclasses.asdict(ctx.loss_args), "training": training.to_dict(),
                "recover": dataclasses.asdict(ctx.recover_args), "stage": name}
    curve = HeldOutCurveCallback(ctx.held, ctx.clock, base_s + done_s, ctx.marks, ctx.log, points)
    resume = ResumePointCallback(ctx.clock, base_s + done_s, ctx.resume_marks)
    state = {STAGE_STATE_FILE: lambda: json.dumps({"stage": name, "budget_s": budget_s, "base_s": base_s,
                                                   "curve": curve.points})}
    t, excluded = time.process_time(), ctx.clock.excluded
    result = distill_student(student, ctx.teacher, blocks, ctx.tokenizer, data_args=data, loss_args=ctx.loss_args,
                             training_args=training, config=config, budget_s=budget_s, checkpoint=checkpoint,
                             perplexity_ids=ctx.perplexity_ids, all_args=all_args, command=ctx.command,
                             callbacks=[curve, resume], clock=ctx.clock, checkpoint_files=state)
    ctx.clock.excluded = excluded + time.process_time() - t - result.train_cpu_s  # all but the budgeted loop
    release_memory()
    loss = ctx.clock.excluding(lambda: held_out_loss(result.student, ctx.held))
    return StageResult(name, loss, math.exp(loss), ctx.clock.used(), {
        "steps": result.steps, "planned_steps": result.planned_steps, "train_cpu_s": result.train_cpu_s,
        "train_tokens": result.steps * tokens_per_step(training, data), "seq_length": data.max_seq_length,
        "curve": curve.points, **({"resumed_from": checkpoint.name} if checkpoint else {})}), result


def _drop_resume_points(folder: Path) -> None:
    """Remove a finished KD stage's checkpoints (a later resume point, or the final student, replaces them)."""
    for path in folder.glob("checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)


def _reused(folder: Path, model_args: ModelArguments, result: StageResult,
            perplexity_ids: torch.Tensor | None) -> Distilled:
    """A KD stage a killed run finished, from its resume point ``<folder>/student``: the student and what its run
    measured (its metrics file, ``<folder>/provenance.json``, its steps), with the run's ``perplexity_ids``."""
    student = make_trainable(load_model(folder / "student", dtype=model_args.model_dtype), model_args)
    metrics = read_json(folder / "student" / METRICS_FILE, "remove the stage's folder to train it again")
    prov = folder / PROVENANCE_FILE
    return Distilled(student, metrics, read_json(prov, "remove the stage's folder") if prov.is_file() else None,
                     result.detail.get("steps", 0), result.detail.get("planned_steps"), 0.0,
                     metrics.get("train", {}).get("train_runtime", 0.0), perplexity_ids)


def run_staged_recovery(model_args: ModelArguments, data_args: DataArguments, loss_args: LossArguments,
                        training_args, recover_args: RecoverArguments, task_args: EvalTaskArguments | None = None, *,
                        command: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Run the staged recipe and save the student to ``<output_dir>/student``; returns that folder.

    ``training_args`` (``transformers.TrainingArguments``) drives the e2e stage (its ``max_steps`` is replaced
    by the budget). Stage 1 and a sequential stage 2 resume per block from ``<output_dir>/init`` and
    ``<output_dir>/blocks``; a finished joint stage 2 (``<output_dir>/blocks/joint.json``) and, when stage 4 runs,
    a finished stage 3 (``<output_dir>/e2e/e2e.json``) are reused.

    Raises:
        ValueError / FileExistsError: bad options, a budget too small for the init stage, calibration text
            shorter than asked, a teacher without a discoverable block structure, too little memory or disk
            for the cached hidden states, an existing final student (each before any work).
    """
    recover_args = recover_args.resolved(parse_cpu_budget(recover_args.time_budget))  # saved resolved
    model_args, loss_args, plan = plan_recipe(model_args, loss_args, log=log)
    budget = _check_args(recover_args, model_args, loss_args)
    validate_run_args(model_args, data_args, training_args)
    validate_loss_args(loss_args)
    out = Path(training_args.output_dir)
    final = out / "student"
    if final.exists():
        raise FileExistsError(f"{final} already exists; choose another --output_dir")
    config_file = out / RECOVER_CONFIG_FILE
    saved = read_json(config_file, "remove it (and the stages' folders) or choose another --output_dir") \
        if config_file.is_file() else None
    model_args = resumed_subln_eps(model_args, saved)
    config = config_dict(model_args, data_args, loss_args, recover_args, training_args=training_args)
    if saved is not None:
        if changes := config_changes(saved, config):
            raise UserError(f"{out} holds a staged run started with other options ({changes}); rerun it with the "
                            "same options or choose another --output_dir")
    tokenizer = load_tokenizer(model_args)
    text_blocks = _text_blocks(recover_args, data_args, tokenizer)  # the only tokenization of the training text
    cal, train, held = _split(recover_args, text_blocks)
    eval_ids = eval_token_ids(data_args, tokenizer)  # --eval_files, tokenized once for every KD stage
    teacher = load_teacher(model_args)  # the only teacher: every stage uses it in memory
    decoder_layers(teacher, fix="block-wise recovery needs a standard decoder stack; use `bitdistill distill` instead")
    limit = getattr(teacher.config, "max_position_embeddings", None)
    for flag, length in (("--calibration_seq_length", held.shape[1]), ("--block_seq_length", train.shape[1])):
        if limit is not None and length > limit:
            raise UserError(f"{flag} {length} exceeds the teacher's context of {limit} tokens; lower it")
    context_length = recover_args.context_length
    if context_length is None:
        context_length = min(512, limit or 512)
    elif limit is not None and context_length > limit:
        raise UserError(f"--context_length {context_length} exceeds the teacher's context of {limit} tokens; lower "
                         "it (0 turns the context stage off)")
    context_fraction = recover_args.context_fraction
    context = context_length > data_args.max_seq_length and context_fraction > 0
    if context:
        need = math.ceil((held.shape[0] + 1) * held.shape[1] / context_length) + 1  # validation blocks + one
        have = (train.numel() + held.numel()) // context_length
        if have < need:
            raise UserError(f"the training text has {have} blocks of {context_length} tokens, fewer than the {need} "
                             "the context stage needs (its held-out tail and one to train on); give more text or "
                             "lower --context_length (0: no context stage)")
    share = budget * recover_args.block_fraction
    per = recover_args.block_micro_batch
    scales = 5 if recover_args.block_init == "gptq" else 0
    while cal.shape[0] > per and estimate_init_cpu_s(teacher, cal.numel(), scales) > share / 2:
        cal = cal[: cal.shape[0] - per]
    estimate = estimate_init_cpu_s(teacher, cal.numel(), scales)
    if estimate >= share:
        raise UserError(f"--time_budget {recover_args.time_budget} leaves {share:.3g} "
                         f"CPU-s for init + blocks, but the first stage alone needs about {estimate:.2g} CPU-s "
                         "for this teacher and calibration size; raise the budget or lower --calibration_tokens")
    clock = CpuClock()
    torch.manual_seed(training_args.seed)
    student = prepare_student(model_args, teacher, calibration_input_ids=cal[:8])
    model_args, config = record_subln_eps(model_args, config, student)
    _atomic_json(config_file, config)  # creates the folder
    if plan is not None:
        plan.record(student)
    student.eval()
    results: list[StageResult] = []

    def record(r: StageResult) -> None:
        results.append(r)
        log(r.line())
        _append_audit(out, r)

    def reuse(marker: Path, what: str, folder: Path) -> None:
        """A stage a killed run finished (``marker``: its result and training CPU time) counts as done."""
        done = json.loads(marker.read_text())
        clock.excluded -= done["cpu_s"]
        results.append(StageResult(**done["result"]))
        log(f"{what} stage already finished in {folder}: {results[-1].line()}")

    def finish(stage: str, model: nn.Module, detail: dict) -> None:
        loss = clock.excluding(lambda: held_out_loss(model, held))
        record(StageResult(stage, loss, math.exp(loss), clock.used(), detail))

    teacher_loss = clock.excluding(lambda: held_out_loss(teacher, held))
    log(f"teacher: held-out loss {teacher_loss:.4f}, perplexity {math.exp(teacher_loss):.2f}")
    base = dict(lr=recover_args.block_lr, micro_batch=recover_args.block_micro_batch, loss=recover_args.block_loss,
                student_inputs=recover_args.block_student_inputs, seed=training_args.seed)
    mem = None if recover_args.state_memory_mb is None else recover_args.state_memory_mb * 2**20
    val = held[: min(held.shape[0], max(BLOCK_VAL_BLOCKS, per)) // per * per]
    val = val if val.shape[0] else None
    if recover_args.block_init == "gptq":
        rep = reconstruct_blocks_in_place(student, teacher, cal, BlockwiseConfig(init="gptq", steps=0, **base),
                                          val_ids=val, work_dir=out / "init", memory_budget=mem, progress=False)
        finish("init", student, {"blocks": rep.blocks})
    block_budget = share - clock.used()
    resume_marks = [budget * k / recover_args.resume_points for k in range(1, recover_args.resume_points)]
    steps = recover_args.block_steps
    stage2 = out / "stage2_student"
    joint_file = out / "blocks" / "joint.json"
    if recover_args.block_mode == "joint" and stage2.exists() and joint_file.is_file():
        reuse(joint_file, "block", stage2)
        student = clock.excluding(lambda: make_trainable(load_model(stage2, dtype=model_args.model_dtype), model_args))
    elif recover_args.block_mode == "joint" and steps != 0 and block_budget > 0:
        cfg = JointConfig(lr=recover_args.block_lr, micro_batch=recover_args.block_micro_batch,
                          loss=recover_args.block_loss, seed=training_args.seed, bf16=training_args.bf16,
                          inputs="student" if recover_args.block_student_inputs else "teacher")
        at = clock.used()  # the resume points' marks, counted on the stage's own clock
        rep = reconstruct_jointly_in_place(student, teacher, train, cfg, steps=steps,
                                           budget_cpu_s=None if steps is not None else block_budget,
                                           val_ids=val, log=log, work_dir=out / "blocks",
                                           save_marks=[m - at for m in resume_marks if m > at])
        clock.excluded -= rep.resumed_cpu_s  # a resumed stage: the CPU an earlier process spent on it
        finish("blocks", student, {"steps": rep.steps, "planned_steps": rep.planned_steps, "val_before": rep.val_before,
                                   "val_after": rep.val_after, "train_tokens": rep.steps * recover_args.block_micro_batch
                                   * train.shape[1]})
        joint_file.parent.mkdir(parents=True, exist_ok=True)
        _atomic_json(joint_file, {"cpu_s": rep.cpu_s, "result": dataclasses.asdict(results[-1])})
    elif steps != 0 and block_budget > 0:
        rep = reconstruct_blocks_in_place(student, teacher, cal, BlockwiseConfig(init="keep", steps=steps, **base),
                                          val_ids=val, budget_cpu_s=block_budget, work_dir=out / "blocks",
                                          memory_budget=mem, progress=not training_args.disable_tqdm, log=log)
        finish("blocks", student, {"blocks": rep.blocks})
    if not stage2.exists():  # the resume point of the KD stages
        clock.excluding(lambda: save_student(student, tokenizer, stage2))
    (out / "blocks" / JOINT_RESUME_FILE).unlink(missing_ok=True)  # replaced by stage2_student
    if not context:
        log("no context stage: " + (f"--context_length {context_length} is not above --max_seq_length "
                                     f"{data_args.max_seq_length}" if context_fraction else "its share is 0"))
    ctx = _Stage(teacher, tokenizer, text_blocks, held, clock, model_args, loss_args, recover_args, command, eval_ids,
                 tenth_marks(budget) if recover_args.held_out_curve else [], resume_marks, log)
    last: tuple[DataArguments, object, Distilled] | None = None  # the last KD stage's data, training args and run
    e2e_file = out / "e2e" / "e2e.json"
    if e2e_file.is_file():
        reuse(e2e_file, "e2e", out / "e2e")
        distilled = clock.excluding(lambda: _reused(out / "e2e", model_args, results[-1], eval_ids))
        student = distilled.student
        last = (data_args, training_args, distilled)
    elif budget - clock.used() > 0:
        r, distilled = _kd_stage("e2e", student, (budget - clock.used()) * (1 - context_fraction if context else 1),
                                 data_args, training_args, ctx, out / "e2e")
        student = distilled.student
        last = (data_args, training_args, distilled)
        if context:  # the resume point of the context stage
            clock.excluding(lambda: save_student(distilled.student, tokenizer, out / "e2e" / "student",
                                                 {METRICS_FILE: json.dumps(distilled.metrics, indent=2, default=str)}))
            _atomic_json(e2e_file, {"cpu_s": distilled.train_cpu_s, "result": dataclasses.asdict(r)})
            _drop_resume_points(out / "e2e")
        record(r)
    if context and budget - clock.used() > 0:
        long_training = copy.copy(training_args)
        long_training.learning_rate = recover_args.context_learning_rate
        long_training.per_device_train_batch_size = max(1, math.ceil(
            training_args.per_device_train_batch_size * data_args.max_seq_length / context_length))
        long_data = dataclasses.replace(data_args, max_seq_length=context_length)
        r, distilled = _kd_stage("context", student, budget - clock.used(), long_data, long_training, ctx,
                                 out / "context")
        student = distilled.student
        last = (long_data, long_training, distilled)
        record(r)
    block_tokens = sum(r.detail["train_tokens"] if "train_tokens" in r.detail else sum(b["steps"] for b in r.detail["blocks"])
                       * recover_args.block_micro_batch * recover_args.calibration_seq_length
                       for r in results if r.stage == "blocks")
    e2e_tokens = sum(r.detail.get("train_tokens", 0) for r in results if r.stage in ("e2e", "context"))
    summary = {"budget_cpu_s": budget, "teacher_held_out_loss": teacher_loss, "calibration_tokens": cal.numel(),
               "train_tokens": block_tokens + e2e_tokens, "block_train_tokens": block_tokens,
               "e2e_train_tokens": e2e_tokens,
               "held_out_tokens": held.numel(), "held_out_curve": [
                   p for r in results for p in [*r.detail.get("curve", []), [r.cpu_s / 60, r.held_out_perplexity]]],
               "stages": [dataclasses.asdict(r) for r in results], "recover_args": {
                   **dataclasses.asdict(recover_args),
                   "context_fraction": context_fraction if context else 0.0, "context_length": context_length}}
    _save_final(final, student, teacher, tokenizer, last, model_args, loss_args, task_args or EvalTaskArguments(),
                _card_section(results, budget, teacher_loss, _continuations(teacher, student, tokenizer)),
                plan.as_dict() if plan is not None else None)
    _atomic_json(out / RESULT_FILE, summary)
    for stage in ("e2e", "context"):
        _drop_resume_points(out / stage)
    return final


def _save_final(final: Path, student: nn.Module, teacher: nn.Module, tokenizer,
                last: tuple[DataArguments, object, Distilled] | None, model_args: ModelArguments,
                loss_args: LossArguments, task_args: EvalTaskArguments, section: str, recipe: dict | None) -> None:
    """Write the recovered student to ``final`` with its metrics (the last KD stage's, the packed student's and the
    downstream tasks'; ``recipe``: the parts skipped and the export targets) and its model card (the distillation
    card of the last KD stage, then the stage table)."""
    if last is None:  # no KD stage ran: the card has the stage table only
        save_student(student, tokenizer, final, {"README.md": section.lstrip()})
        return
    data, training, distilled = last
    extra = packed_and_task_metrics(student, teacher, tokenizer, distilled.perplexity_ids, data, task_args)
    distilled.metrics.update({**({"recipe": recipe} if recipe else {}), **extra})
    card = StudentCard(model_args, data, loss_args, training, distilled, sections=[section])
    save_student(student, tokenizer, final, card.files(config_dict(model_args, data, loss_args,
                                                                   training_args=training)))
