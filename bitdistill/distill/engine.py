"""The distillation engine: train a student from a teacher already in memory, optionally in a CPU-time budget.

:func:`distill_student` is the core every KD run goes through: ``bitdistill distill`` (:mod:`bitdistill.distill.run`
loads the models and the text, calls it once, saves the result) and each KD stage of ``bitdistill recover``
(:mod:`bitdistill.recover.staged` holds one teacher and one tokenized text and calls it per stage). It takes the
models, the token blocks and the argument dataclasses, builds what the loss terms need (layer map, projectors,
attention captures), the :class:`~bitdistill.distill.trainer.DistillationTrainer` and its callbacks, runs the run
skeleton (:func:`run_trainer`, which ``self-distill`` runs too) and returns the trained student with its metrics. It loads and saves
no model; the caller decides what goes to disk. :func:`save_student` writes a student folder.

:func:`resolve_recipe_parts` is the one place that decides which recipe parts (SubLN, the attention-relation loss)
apply to a teacher's architecture.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from bitdistill.audit import tensorboard_into_output_dir
from bitdistill.budget import BUDGET_STATE_FILE, CpuBudgetCallback, CpuClock, resumed_budget_state
from bitdistill.data.args import DataArguments
from bitdistill.distill.args import LossArguments
from bitdistill.distill.attention import QKVCapture, resolve_layer_indices
from bitdistill.distill.layer_map import build_layer_map
from bitdistill.distill.teacher_cache import TeacherCache
from bitdistill.distill.terms import needed_outputs
from bitdistill.distill.trainer import PROJECTOR_ATTR, DistillationTrainer
from bitdistill.distill.warmup import QuantWarmup
from bitdistill.errors import UserError
from bitdistill.eval.perplexity import strided_perplexity
from bitdistill.fsdp.training import prepare_student_for_fsdp, unsharded_student
from bitdistill.io import atomic_output_dir
from bitdistill.runs import RunSetup, RunTrainer, record_provenance, setup_run

__all__ = ["Distilled", "TrainedRun", "distill_student", "run_trainer", "save_student"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Distilled:
    """A trained student and what its run measured.

    Attributes:
        student: the trained model (unwrapped; hidden-state projectors, if any, still attached; under FSDP the
            gathered student on rank 0 and ``None`` on the other ranks).
        metrics: ``teacher`` (perplexity of ``--eval_files``), ``student_start``, ``train`` (the Trainer's,
            with ``train_steps``, ``train_cpu_s`` and, with a budget, ``budget_cpu_s`` and ``planned_steps``),
            ``student_end``, each present when measured (the card reads them).
        provenance: the run's ``provenance.json`` content (``None`` off the main process).
        steps: optimizer steps done; planned_steps: the budget's last plan (``None`` without a budget).
        train_cpu_s: process CPU seconds of the training loop (evaluations before and after excluded).
        train_seconds: its wall seconds.
        perplexity_ids: the tokenized ``--eval_files`` (``None`` without).
    """

    student: nn.Module | None
    metrics: dict
    provenance: dict | None
    steps: int
    planned_steps: int | None
    train_cpu_s: float
    train_seconds: float
    perplexity_ids: torch.Tensor | None


@dataclasses.dataclass
class TrainedRun:
    """What :func:`run_trainer` measured: evaluations before (``None`` when resumed or not asked) and after, the
    train metrics (the Trainer's, with ``train_steps``, ``train_cpu_s`` and, in a budget, ``budget_cpu_s`` and
    ``planned_steps``), the provenance record (``None`` off the main process), wall seconds, steps, process CPU
    seconds of the training loop and the budget's last plan (``None`` without a budget)."""

    start: dict | None
    train: dict
    final: dict | None
    provenance: dict | None
    train_seconds: float
    steps: int
    train_cpu_s: float
    planned_steps: int | None


def run_trainer(trainer: RunTrainer, run: RunSetup, *, checkpoint: Path | None, all_args: dict, command: str | None,
                evaluate: bool, checkpoint_files: dict[str, Callable[[], str]] | None = None) -> TrainedRun:
    """The one run skeleton of every trainer: checkpoint files and TensorBoard into the output folder, provenance,
    an evaluation before training (``evaluate`` and not resumed), training (resumed from ``checkpoint``), an
    evaluation after (``evaluate``). Evaluations are audited apart from the training steps.

    Every checkpoint holds the run configuration, a budgeted run's CPU budget state
    (:data:`~bitdistill.budget.BUDGET_STATE_FILE`, read back when it resumes) and ``checkpoint_files``
    (``{file name: function returning its text}``, called as each checkpoint is written).

    Raises:
        UserError: a run resuming a checkpoint of another budget (:func:`~bitdistill.budget.resumed_budget_state`).
    """
    files: dict[str, str | Callable[[], str]] = {**run.checkpoint_files, **(checkpoint_files or {})}
    budget = trainer.cpu_budget
    state = resumed_budget_state(checkpoint, budget.budget_s if budget is not None else None)
    if budget is not None:
        files[BUDGET_STATE_FILE] = lambda: json.dumps(budget.state())
        if state is not None:
            budget.load_state(state)
    trainer.checkpoint_files = files
    tensorboard_into_output_dir(trainer)
    prov = None
    if trainer.is_world_process_zero():
        prov = record_provenance(Path(trainer.args.output_dir), all_args, command, resumed=checkpoint is not None)
    start = final = None
    if checkpoint is None and evaluate:
        run.audit.evaluation_begins()
        start = trainer.evaluate(metric_key_prefix="start")
    started, cpu = time.perf_counter(), time.process_time()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds, train_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    if evaluate:
        run.audit.evaluation_begins()
        final = trainer.evaluate(metric_key_prefix="final")
    train = dict(result.metrics)
    budget, steps = trainer.cpu_budget, trainer.state.global_step
    if budget is not None:
        train_cpu_s = budget.used_s
        if train.get("train_runtime"):  # transformers counted the epochs' samples
            a = trainer.args
            samples = steps * a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
            train["train_samples_per_second"] = round(samples / train["train_runtime"], 3)
    train.update({"train_steps": steps, "train_cpu_s": train_cpu_s,
                  **({"budget_cpu_s": budget.budget_s, "planned_steps": budget.planned_steps} if budget else {})})
    return TrainedRun(start, train, final, prov, train_seconds, steps, train_cpu_s,
                      budget.planned_steps if budget else None)


def _loss_structures(student: nn.Module, teacher: nn.Module | None, loss_args: LossArguments
                     ) -> tuple[list | None, tuple[list[int], list[int]] | None]:
    """The hidden-state layer map (with projectors attached to ``student`` where asked or where widths differ) and
    the attention-relation blocks ``(student, teacher)``; unsupported blocks are refused here."""
    s_need, _ = needed_outputs(loss_args)
    layer_map = None
    if "hidden_states" in s_need:
        layer_map = build_layer_map(loss_args.hidden_layer_map, student.config.num_hidden_layers,
                                    teacher.config.num_hidden_layers)
        hs, ht = student.config.hidden_size, teacher.config.hidden_size
        if (loss_args.hidden_projector or hs != ht) and getattr(student, PROJECTOR_ATTR, None) is None:
            setattr(student, PROJECTOR_ATTR, nn.ModuleList(nn.Linear(hs, ht, bias=False) for _ in layer_map))
    attention_layers = None
    if "qkv" in s_need:
        ls, lt = student.config.num_hidden_layers, teacher.config.num_hidden_layers
        s_layers = resolve_layer_indices(loss_args.attention_layers, ls, "student")
        t_layers = [round(i * (lt - 1) / max(ls - 1, 1)) for i in s_layers]
        attention_layers = (s_layers, t_layers)
        for m, layers in ((student, s_layers), (teacher, t_layers)):
            QKVCapture(m, layers)  # refuses unsupported blocks (the trainer builds its own captures)
    return layer_map, attention_layers


class _WarmupCallback(TrainerCallback):
    """Sets the quantization warm-up blend at the start of each optimizer step."""

    def __init__(self, warmup: QuantWarmup) -> None:
        self.warmup = warmup

    def on_step_begin(self, args, state, control, **kwargs):
        self.warmup.set_step(state.global_step)


def distill_student(student: nn.Module, teacher: nn.Module | None, blocks: torch.Tensor, tokenizer, *,
                    data_args: DataArguments, loss_args: LossArguments, training_args, config: dict,
                    teacher_cache: TeacherCache | None = None, budget_s: float | None = None,
                    checkpoint: Path | None = None, quant_warmup_steps: int = 0,
                    callbacks: list[TrainerCallback] | None = None, perplexity_ids: torch.Tensor | None = None,
                    all_args: dict | None = None, command: str | None = None,
                    clock: CpuClock | None = None,
                    checkpoint_files: dict[str, Callable[[], str]] | None = None) -> Distilled:
    """Distill ``student`` (trained in place) from ``teacher`` on ``blocks [N, S]``; returns it with its metrics.

    Args:
        student: the converted student (``requires_grad`` set where it trains).
        teacher: the frozen teacher, or ``None`` with ``teacher_cache``.
        blocks: the training token blocks; the last ``data_args.validation_blocks`` are held out.
        tokenizer: tokenizes ``data_args.eval_files`` for the perplexity evaluations (unless ``perplexity_ids``).
        data_args, loss_args: the run's data and loss options.
        training_args: a ``transformers.TrainingArguments``; ``output_dir`` receives the audit log, provenance and
            checkpoints. With ``budget_s`` its ``max_steps`` must be unset (-1).
        config: the run configuration (:func:`bitdistill.runs.config_dict`) written into every checkpoint.
        teacher_cache: cached top-k teacher logits in place of the teacher's.
        budget_s: process CPU seconds for the training loop: training stops when they are spent and the
            learning-rate schedule is fit to the steps they buy (:class:`~bitdistill.budget.CpuBudgetCallback`).
        checkpoint: a checkpoint of this run to resume from (with ``budget_s``, it continues the CPU time and plan
            the checkpoint recorded).
        quant_warmup_steps: blend quantization in over this many steps.
        callbacks: extra ``TrainerCallback`` objects.
        perplexity_ids: ``data_args.eval_files`` already tokenized (``[T]``, :func:`bitdistill.runs.eval_token_ids`),
            so a caller running the engine several times on the same text tokenizes it once.
        all_args: every argument, for ``provenance.json``; command: the command line, for it.
        clock: the clock ``budget_s`` is counted on (what runs through its ``excluding`` inside the loop, e.g. a
            caller's held-out evaluations, is not counted); default: a clock of the training loop's own.
        checkpoint_files: ``{file name: function returning its text}`` written into every checkpoint (a caller's
            own resume state).
    """
    if budget_s is not None and training_args.max_steps > 0:
        raise UserError("--time_budget plans the steps itself; drop --max_steps (or the budget)")
    layer_map, attention_layers = _loss_structures(student, teacher, loss_args)
    budget = CpuBudgetCallback(budget_s, clock=clock) if budget_s is not None else None
    run = setup_run(blocks, tokenizer, data_args, training_args, config,
                    [*([budget] if budget else []), *(callbacks or [])], perplexity_ids)
    if quant_warmup_steps > 0:
        run.callbacks.append(_WarmupCallback(QuantWarmup(student, quant_warmup_steps)))
    prepare_student_for_fsdp(run.training_args, student)  # FSDP: wrap class, rank 0 can save, opt-in ternary gather
    trainer = DistillationTrainer(
        model=student, args=run.training_args, train_dataset=run.train_ds, teacher=teacher, teacher_cache=teacher_cache,
        loss_args=loss_args, hidden_layer_map=layer_map, attention_layers=attention_layers,
        perplexity_ids=run.ppl_ids, perplexity_window=data_args.max_seq_length, perplexity_stride=data_args.eval_stride,
        perplexity_max_windows=data_args.eval_max_windows, validation_dataset=run.val_ds, callbacks=run.callbacks)
    metrics: dict[str, dict] = {}
    if run.ppl_ids is not None and teacher is not None and trainer.is_world_process_zero():
        r = strided_perplexity(teacher, run.ppl_ids, **trainer.perplexity_settings)
        metrics["teacher"] = {"perplexity": r.perplexity, "tokens": r.num_tokens}
        logger.info("teacher perplexity: %.2f (%d tokens of --eval_files)", r.perplexity, r.num_tokens)
    logger.info("training (%s)", f"a budget of {budget_s:.0f} CPU-s" if budget_s is not None else
                f"{training_args.max_steps} steps" if training_args.max_steps > 0 else
                f"{training_args.num_train_epochs} epochs")
    done = run_trainer(trainer, run, checkpoint=checkpoint, all_args=all_args or {}, command=command,
                       evaluate=run.ppl_ids is not None, checkpoint_files=checkpoint_files)
    if done.start is not None:
        metrics["student_start"] = done.start
        _log_perplexity("student perplexity before training", done.start.get("start_perplexity"))
    metrics["train"] = done.train
    if done.final is not None:
        metrics["student_end"] = done.final
        _log_perplexity("student perplexity after training", done.final.get("final_perplexity"))
    trained = unsharded_student(trainer.accelerator.unwrap_model(trainer.model))  # FSDP: a collective; None off rank 0
    return Distilled(trained, metrics, done.provenance, done.steps, done.planned_steps, done.train_cpu_s,
                     done.train_seconds, run.ppl_ids)


def _log_perplexity(what: str, value: float | None) -> None:
    if value is not None:
        logger.info("%s: %.2f", what, value)


def save_student(student: nn.Module, tokenizer, folder: Path, files: dict[str, str] | None = None) -> None:
    """Write ``student`` (``save_pretrained``, without hidden-state projectors), ``tokenizer`` and ``files``
    (``{name: text}``: configuration, metrics, model card) into ``folder`` atomically (refused if it exists)."""
    projectors = getattr(student, PROJECTOR_ATTR, None)
    if projectors is not None:
        delattr(student, PROJECTOR_ATTR)
    try:
        with atomic_output_dir(folder) as tmp:
            student.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            for name, text in (files or {}).items():
                (tmp / name).write_text(text)
    finally:
        if projectors is not None:
            setattr(student, PROJECTOR_ATTR, projectors)
