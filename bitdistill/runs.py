"""Run plumbing shared by ``bitdistill distill`` (and so every KD stage of ``recover``) and ``self-distill``: run
folder, resume checks, data, callbacks, and :class:`RunTrainer`, the base of both trainers.

Both trainers build their run the same way: validate ``--output_dir`` and the checkpoint to resume from
(:func:`check_run_folder`, against the configuration :func:`config_dict` records), tokenize the training
blocks (:func:`build_blocks`), split off the held-out blocks and build the callbacks (:func:`setup_run`), and
write ``provenance.json`` (:func:`record_provenance`). Both trainers derive from :class:`RunTrainer`: the
per-term loss logging, the perplexity settings and the CPU budget live there once (the run skeleton that drives
them, ``bitdistill.distill.engine.run_trainer``, sits in the layer of the trainers it calls). This module sits below
``distill``/``selfdistill`` and imports neither.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from bitdistill.audit import PROVENANCE_FILE, AuditCallback, write_provenance
from bitdistill.budget import BudgetProgressCallback, CpuBudgetCallback
from bitdistill.checkpoints import (
    AtomicCheckpointMixin,
    clean_partial_checkpoints,
    latest_checkpoint,
    require_complete,
)
from bitdistill.data.args import DataArguments
from bitdistill.data.blocks import BlockDataset, load_text, token_blocks, tokenize_text
from bitdistill.errors import UserError
from bitdistill.weights import read_json

__all__ = [
    "CONFIG_FILE",
    "EvalEveryCallback",
    "RunSetup",
    "RunTrainer",
    "ScheduledCheckpointsOnly",
    "build_blocks",
    "check_eval_schedule",
    "check_run_folder",
    "config_changes",
    "config_dict",
    "record_provenance",
    "recorded_config",
    "setup_run",
    "tokens_per_step",
]

CONFIG_FILE = "distill_config.json"
# Options that may change between a run and its resumption (everything else must match).
_RESUMABLE_CHANGES = {"output_dir", "resume_from_checkpoint", "max_steps", "num_train_epochs", "logging_steps",
                      "save_steps", "eval_steps", "eval_files", "eval_stride", "eval_max_windows", "report_to",
                      "logging_dir", "data_cache_dir", "save_total_limit", "disable_tqdm",
                      "recipe_defaults"}  # says only which options were defaults; their values are compared
# Training options recorded in the run configuration (a resume must keep them).
_TRAINING_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
                  "lr_scheduler_type", "warmup_steps", "seed", "data_seed", "optim", "bf16", "fp16",
                  "max_grad_norm", "adam_beta1", "adam_beta2")


def _cache_dir(data_args: DataArguments) -> str | None:
    if data_args.data_cache_dir == "none":
        return None
    return data_args.data_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "bitdistill", "data")


def build_blocks(data_args: DataArguments, tokenizer) -> torch.Tensor:
    """Training token blocks ``[N, max_seq_length]`` (including the held-out validation rows)."""
    text = load_text(data_args.train_files or None, dataset_name=data_args.dataset_name,
                     dataset_config_name=data_args.dataset_config_name, split=data_args.dataset_split,
                     text_column=data_args.text_column)
    blocks = token_blocks(text, tokenizer, data_args.max_seq_length, cache_dir=_cache_dir(data_args))
    if data_args.max_train_blocks is not None:
        blocks = blocks[: data_args.max_train_blocks]
    if blocks.shape[0] <= data_args.validation_blocks:
        raise UserError(f"{blocks.shape[0]} blocks of {data_args.max_seq_length} tokens leave none for training "
                        f"after holding out {data_args.validation_blocks}; give more text")
    return blocks


def eval_token_ids(data_args: DataArguments, tokenizer) -> torch.Tensor | None:
    """The token ids ``[T]`` of ``--eval_files`` (the perplexity text), ``None`` without."""
    return tokenize_text(load_text(data_args.eval_files), tokenizer) if data_args.eval_files else None


def config_dict(*arg_dataclasses, training_args) -> dict:
    """The run configuration: every field of ``arg_dataclasses`` (later ones win) and the training options
    that shape the optimization, JSON-ready. Written into every checkpoint and compared on resume."""
    out: dict = {}
    for args in arg_dataclasses:
        out.update(dataclasses.asdict(args))
    out.update({k: getattr(training_args, k, None) for k in _TRAINING_KEYS})
    return json.loads(json.dumps(out, default=str))


def config_changes(saved: dict, config: dict) -> str:
    """The options a resumed run may not change that differ between ``saved`` and ``config`` (both from
    :func:`config_dict`), as ``"key: old -> new, ..."``; empty when none do."""
    diff = sorted(k for k in set(saved) | set(config)
                  if k not in _RESUMABLE_CHANGES and saved.get(k) != config.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in diff)


def _check_resume(checkpoint: Path, config: dict) -> None:
    saved_file = checkpoint / CONFIG_FILE
    if not saved_file.is_file():
        raise UserError(f"{checkpoint} has no {CONFIG_FILE}; it was not written by `bitdistill distill` or "
                        "`self-distill` (or is incomplete): resume from another checkpoint")
    saved = read_json(saved_file, "the checkpoint is damaged: resume from another one")
    if details := config_changes(saved, config):
        raise UserError(f"cannot resume from {checkpoint}: it was written with a different configuration ({details}); "
                        "resume with the same options or start a new --output_dir")


def _resolve_checkpoint(training_args, output_dir: Path) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names: ``latest`` is the last *complete* one."""
    r = training_args.resume_from_checkpoint
    if r in (None, "", "false", "False"):
        return None
    if r in ("true", "True", "latest"):
        last = latest_checkpoint(output_dir, required=(CONFIG_FILE,))
        if last is None:
            raise FileNotFoundError(f"no complete checkpoint-* folder in {output_dir} to resume from; start a new run "
                                    "(drop --resume_from_checkpoint)")
        return last
    require_complete(Path(r), required=(CONFIG_FILE,))
    return Path(r)


def recorded_config(training_args) -> dict | None:
    """The run configuration recorded in the checkpoint ``--resume_from_checkpoint`` names; ``None`` for a new run or
    when there is none to read (:func:`check_run_folder` then says why). A resumed run takes the values its defaults
    resolved to from here (e.g. the SubLN eps), so a default that changed since does not change the run."""
    try:
        checkpoint = _resolve_checkpoint(training_args, Path(training_args.output_dir))
        if checkpoint is None or not (checkpoint / CONFIG_FILE).is_file():
            return None
        return read_json(checkpoint / CONFIG_FILE, "")
    except (OSError, UserError):
        return None


def check_eval_schedule(training_args) -> int | None:
    """The evaluation interval in optimizer steps (``None``: no evaluation) that ``--eval_strategy``/``--eval_steps``
    ask for; :class:`UserError` for a schedule these block datasets cannot follow."""
    strategy = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy))
    if strategy not in ("no", "steps"):
        raise UserError(f"--eval_strategy {strategy} is not supported here; use steps (with an integer "
                        "--eval_steps) or no")
    eval_steps = training_args.eval_steps if strategy == "steps" else None
    if eval_steps is not None and (float(eval_steps) != int(eval_steps) or eval_steps < 1):
        raise UserError(f"--eval_steps must be a whole number of optimizer steps >= 1, got {eval_steps}")
    return int(eval_steps) if eval_steps else None


def check_run_folder(training_args, config: dict, final_dir: Path) -> Path | None:
    """Validate ``--output_dir`` before a run and return the checkpoint to resume from (``None``: a new run).

    A new run refuses a folder holding checkpoints, a final model or an earlier run's provenance; a resumed
    run must have the configuration its checkpoint was written with (see ``_RESUMABLE_CHANGES``). Staging
    folders of checkpoints a killed run did not finish are removed first (they are never resumed from). The
    evaluation schedule is checked too, so nothing is written for a run that would be refused later.
    """
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir} is a file; choose a folder")
    check_eval_schedule(training_args)
    if training_args.process_index == 0:
        clean_partial_checkpoints(output_dir)
    checkpoint = _resolve_checkpoint(training_args, output_dir)
    if checkpoint is not None:
        _check_resume(checkpoint, config)
    elif output_dir.is_dir() and any(p.is_dir() for p in output_dir.glob("checkpoint-*")):
        raise FileExistsError(f"{output_dir} already holds checkpoints; pass --resume_from_checkpoint latest to "
                              "continue, or choose another --output_dir")
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} already exists; choose another --output_dir")
    if checkpoint is None and training_args.process_index == 0 and (output_dir / PROVENANCE_FILE).exists():
        raise FileExistsError(f"{output_dir / PROVENANCE_FILE} already exists (an earlier run); choose another "
                              "--output_dir")
    return checkpoint


def tokens_per_step(training_args, data_args: DataArguments) -> int:
    """Tokens one optimizer step consumes over all processes."""
    return (training_args.per_device_train_batch_size * data_args.max_seq_length
            * training_args.gradient_accumulation_steps * training_args.world_size)


def record_provenance(output_dir: Path, all_args: dict, command: str | None, *, resumed: bool) -> dict:
    """Write ``provenance.json`` (a resumed run: ``provenance-resume-<time>.json``) and return its content."""
    name = PROVENANCE_FILE if not resumed else f"provenance-resume-{time.strftime('%Y%m%dT%H%M%S')}.json"
    return json.loads(write_provenance(output_dir, all_args, command, name=name).read_text())


class EvalEveryCallback(TrainerCallback):
    """Ask the trainer to evaluate every ``steps`` optimizer steps (used for perplexity evaluations)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if self.steps > 0 and state.global_step % self.steps == 0:
            control.should_evaluate = True
        return control


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


class ScheduledCheckpointsOnly(TrainerCallback):
    """Checkpoints on the ``--save_steps`` schedule only: no extra one when training finishes.

    transformers saves a full checkpoint (weights plus optimizer state: about 12 bytes a parameter with fp32
    AdamW) at the last step whatever the schedule. A finished run's result is its saved model folder, and
    checkpoints are for resuming interrupted runs, so that last checkpoint would be three times the size of the
    student for nothing. Runs on the schedule, interrupted runs and callbacks asking for a save still save.
    """

    def on_step_end(self, args, state, control, **kwargs):
        strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
        on_schedule = state.save_steps > 0 and state.global_step % state.save_steps == 0
        if strategy == "steps" and state.global_step >= state.max_steps and not on_schedule:
            control.should_save = False
        return control


@dataclasses.dataclass
class RunSetup:
    """What :func:`setup_run` prepares for a Trainer: its arguments, datasets, evaluation ids, callbacks, the audit log."""

    training_args: object
    train_ds: BlockDataset
    val_ds: BlockDataset | None
    ppl_ids: torch.Tensor | None
    callbacks: list[TrainerCallback]
    audit: AuditCallback
    config_json: str

    @property
    def checkpoint_files(self) -> dict[str, str]:
        """``{file name: text}`` every checkpoint of the run holds (the run configuration)."""
        return {CONFIG_FILE: self.config_json}


def setup_run(blocks: torch.Tensor, tokenizer, data_args: DataArguments, training_args, config: dict,
              callbacks: list[TrainerCallback] | None, perplexity_ids: torch.Tensor | None = None) -> RunSetup:
    """Split off the held-out blocks, tokenize the evaluation text (unless ``perplexity_ids``, its token ids ``[T]``
    from :func:`eval_token_ids`, are given) and build the callbacks of a run.

    ``RunSetup.training_args`` is a copy of ``training_args`` adjusted for block datasets (and without pinned
    memory when there is no accelerator to copy to): its evaluation
    schedule (``eval_strategy="steps"`` with an integer ``eval_steps``, or ``"no"``) becomes an
    :class:`EvalEveryCallback` calling the trainer's own ``evaluate``. The callbacks are
    :class:`ScheduledCheckpointsOnly` (first, so the caller's can still ask for a save), the caller's, the
    evaluation one and the audit log (last, so it sees evaluation requests). ``RunSetup.checkpoint_files`` is
    what the trainer writes into every checkpoint before it becomes visible (the run configuration, read back to
    validate a resume; see :class:`bitdistill.checkpoints.AtomicCheckpointMixin`).
    """
    eval_steps = check_eval_schedule(training_args)
    training_args = copy.copy(training_args)
    v = data_args.validation_blocks
    train_ds = BlockDataset(blocks[: blocks.shape[0] - v])
    val_ds = BlockDataset(blocks[blocks.shape[0] - v:], offset=blocks.shape[0] - v) if v else None
    ppl_ids = perplexity_ids if perplexity_ids is not None else eval_token_ids(data_args, tokenizer)
    training_args.eval_strategy = "no"
    training_args.remove_unused_columns = False
    training_args.prediction_loss_only = True
    # Pinned memory only helps copies to an accelerator; without one torch warns on every data loader.
    training_args.dataloader_pin_memory = training_args.dataloader_pin_memory and _accelerator_available()
    callbacks = [ScheduledCheckpointsOnly(), *(callbacks or [])]
    if eval_steps:
        callbacks.append(EvalEveryCallback(eval_steps))
    config_json = json.dumps(config, indent=2)
    audit = AuditCallback(tokens_per_step=tokens_per_step(training_args, data_args))
    callbacks.append(audit)
    return RunSetup(training_args, train_ds, val_ds, ppl_ids, callbacks, audit, config_json)


class RunTrainer(AtomicCheckpointMixin, Trainer):
    """The base of bitdistill's trainers: per-term loss logging, perplexity settings and an optional CPU budget.

    A subclass's ``compute_loss`` hands its loss terms to :meth:`record_parts`; each logging step then adds their
    running means under ``PART_PREFIX + name``. With ``PARTS_PER_STEP`` the terms are shares of an accumulation
    window (they sum to the window's mean over its micro-batches) and are averaged per optimizer step; otherwise
    they are micro-batch means, averaged per micro-batch.

    A :class:`~bitdistill.budget.CpuBudgetCallback` among the callbacks makes the run budgeted: training runs until
    the callback stops it (no step or epoch limit of its own), the schedule and ``state.max_steps`` follow its
    plan, and the progress bar shows the plan (:class:`~bitdistill.budget.BudgetProgressCallback`).

    Args:
        perplexity_ids: 1-D token ids for strided perplexity at each evaluation.
        perplexity_window, perplexity_stride, perplexity_max_windows: its settings.
        validation_dataset: held-out blocks for the evaluation loss.
        **kwargs: ``transformers.Trainer`` arguments.
    """

    PART_PREFIX = "loss_"
    PARTS_PER_STEP = True

    def __init__(self, *, perplexity_ids: torch.Tensor | None = None, perplexity_window: int = 512,
                 perplexity_stride: int | None = None, perplexity_max_windows: int | None = None,
                 validation_dataset=None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.perplexity_ids = perplexity_ids
        self.perplexity_window = perplexity_window
        self.perplexity_stride = perplexity_stride
        self.perplexity_max_windows = perplexity_max_windows
        self.validation_dataset = validation_dataset
        self._part_sums: dict[str, float] = {}
        self._part_micro_batches = 0
        self.cpu_budget = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, CpuBudgetCallback)),
                               None)
        if self.cpu_budget is not None and any(isinstance(cb, ProgressCallback) for cb in self.callback_handler.callbacks):
            self.callback_handler.remove_callback(ProgressCallback)
            self.add_callback(BudgetProgressCallback(self.cpu_budget))

    @property
    def perplexity_settings(self) -> dict:
        """Keyword arguments of ``bitdistill.eval.perplexity``'s strided perplexity."""
        return {"max_length": self.perplexity_window, "stride": self.perplexity_stride,
                "max_windows": self.perplexity_max_windows}

    def record_parts(self, parts: dict[str, torch.Tensor], scale: float = 1.0) -> None:
        """Add one training micro-batch's loss terms (scalars) to the running sums the next log line reports."""
        self._part_micro_batches += 1
        for k, v in parts.items():
            self._part_sums[k] = self._part_sums.get(k, 0.0) + v.detach().item() * scale

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._part_sums:
            n = self._part_micro_batches
            n = max(n / self.args.gradient_accumulation_steps, 1.0) if self.PARTS_PER_STEP else n
            for k, v in self._part_sums.items():
                logs[f"{self.PART_PREFIX}{k}"] = round(v / n, 6)
            self._part_sums = {}
            self._part_micro_batches = 0
        super().log(logs, start_time)

    def set_initial_training_values(self, args, dataloader, *rest):
        """transformers' step and epoch counts; a budgeted run has neither limit (its budget stops it, its
        schedule is refit to the plan), so both are unbounded until the budget has planned. ``rest``: the total
        train batch size that transformers before 5 also passes."""
        values = list(super().set_initial_training_values(args, dataloader, *rest))
        if self.cpu_budget is not None:
            values[0] = values[-1] = sys.maxsize  # num_train_epochs, max_steps
        return tuple(values)

