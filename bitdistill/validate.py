"""Every argument of a training run checked before any work starts (nothing loaded, nothing written).

Each check raises a :class:`bitdistill.errors.UserError` (or ``FileNotFoundError``/``IsADirectoryError``)
whose message names the flag, the value and the fix. ``bitdistill distill``, ``cache-teacher`` and
``self-distill`` call these first.
"""

from __future__ import annotations

import math
from pathlib import Path

from bitdistill.data.blocks import read_text_file
from bitdistill.errors import UserError
from bitdistill.weights import check_source

__all__ = ["check_count", "validate_cache_args", "validate_data_args", "validate_model_args",
           "validate_run_args", "validate_self_distill_args", "validate_training_args"]


def check_count(flag: str, value, *, minimum: int = 1, allow_none: bool = False) -> None:
    """``value`` must be a whole number ``>= minimum`` (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{flag} must be a whole number >= {minimum}, got {value!r}")


def _check_number(flag: str, value, *, minimum: float = 0.0, strict: bool = False, maximum: float | None = None
                  ) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value > minimum if strict else value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise UserError(f"{flag} must be a finite number {bound}{f' and <= {maximum}' if maximum is not None else ''}"
                        f", got {value!r}")


def validate_training_args(training_args) -> None:
    """Steps, batch sizes, accumulation, learning rate and the save/log/eval schedules of a ``TrainingArguments``."""
    a = training_args
    if a.max_steps != -1:
        check_count("--max_steps", a.max_steps)
    if a.max_steps == -1:
        _check_number("--num_train_epochs (with --max_steps unset)", a.num_train_epochs, strict=True)
    check_count("--gradient_accumulation_steps", a.gradient_accumulation_steps)
    check_count("--per_device_train_batch_size", a.per_device_train_batch_size)
    _check_number("--learning_rate", a.learning_rate)
    _check_number("--weight_decay", a.weight_decay)
    _check_number("--max_grad_norm", a.max_grad_norm)
    _check_number("--warmup_steps", a.warmup_steps)
    for flag in ("save_steps", "logging_steps"):
        _check_number(f"--{flag}", getattr(a, flag), strict=True)
    check_count("--save_total_limit", a.save_total_limit, allow_none=True)


def _check_text_files(flag: str, files) -> None:
    for f in files or ():
        read_text_file(f, flag)


def validate_data_args(data_args) -> None:
    """Block length, budgets (blocks, windows) and the text files (present, files, UTF-8)."""
    d = data_args
    check_count("--max_seq_length", d.max_seq_length, minimum=2)
    check_count("--max_train_blocks", d.max_train_blocks, allow_none=True)
    check_count("--validation_blocks", d.validation_blocks, minimum=0)
    check_count("--eval_max_windows", d.eval_max_windows, allow_none=True)
    check_count("--eval_stride", d.eval_stride, allow_none=True)
    if d.eval_stride is not None and d.eval_stride > d.max_seq_length:
        raise UserError(f"--eval_stride {d.eval_stride} exceeds --max_seq_length {d.max_seq_length}; use at most that")
    _check_text_files("--train_files", d.train_files)
    _check_text_files("--eval_files", d.eval_files)


def validate_model_args(model_args) -> None:
    """Local model, tokenizer and config paths exist (hub ids are left to the loader), GGUF files included."""
    m = model_args
    for flag, src, gguf in (("--teacher_model_name_or_path", m.teacher_model_name_or_path, m.teacher_gguf_file),
                            ("--student_model_name_or_path", m.student_model_name_or_path, m.student_gguf_file),
                            ("--tokenizer_name_or_path", m.tokenizer_name_or_path, None)):
        if src is None or str(src).startswith("tiny:"):
            continue
        check_source(src, flag)
        if gguf is not None and Path(src).is_dir() and not (Path(src) / gguf).is_file():
            raise FileNotFoundError(f"{Path(src) / gguf} does not exist; the GGUF flag names a file inside {flag}")
    if m.student_config and not str(m.student_config).startswith("tiny:") and not Path(m.student_config).exists():
        raise FileNotFoundError(f"--student_config {m.student_config} not found (give a config.json, a folder "
                                "holding one, or tiny:<arch>)")
    check_count("--quant_warmup_steps", m.quant_warmup_steps, minimum=0)
    if m.subln_eps is not None:
        _check_number("--subln_eps", m.subln_eps, strict=True)


def validate_run_args(model_args, data_args, training_args=None) -> None:
    """All of the above for a ``distill`` run: models and tokenizer, data and budgets, training schedule (the loss
    terms check their own options: ``bitdistill.distill.terms.validate_loss_args``)."""
    validate_model_args(model_args)
    validate_data_args(data_args)
    if training_args is not None:
        validate_training_args(training_args)


def validate_self_distill_args(model_args, sd_args) -> None:
    """``self-distill``'s model source, tokenizer and loss parameters."""
    for flag, src in (("--model_name_or_path", model_args.model_name_or_path),
                      ("--tokenizer_name_or_path", model_args.tokenizer_name_or_path)):
        if src is not None and not str(src).startswith("tiny:"):
            check_source(src, flag)
    if model_args.model_config is not None and not Path(model_args.model_config).exists():
        raise FileNotFoundError(f"--model_config {model_args.model_config} does not exist; pass a config.json or a "
                                "folder holding one")
    if model_args.gguf_file is not None and model_args.model_name_or_path is not None and \
            not (Path(model_args.model_name_or_path) / model_args.gguf_file).is_file():
        raise FileNotFoundError(f"{Path(model_args.model_name_or_path) / model_args.gguf_file} does not exist; "
                                "--gguf_file names a file inside --model_name_or_path")
    _check_number("--alpha", sd_args.alpha, maximum=1.0)
    _check_number("--temperature", sd_args.temperature, strict=True)
    _check_number("--hint_weight", sd_args.hint_weight)
    for w in sd_args.exit_weights or ():
        _check_number("--exit_weights", w)


def validate_cache_args(cache_args) -> None:
    """``cache-teacher``'s own options: output folder, top-k, batch size, temperature."""
    if not cache_args.cache_dir:
        raise UserError("pass --cache_dir (the output folder of the teacher cache)")
    check_count("--top_k", cache_args.top_k)
    check_count("--cache_batch_size", cache_args.cache_batch_size)
    _check_number("--cache_temperature", cache_args.cache_temperature, strict=True)
