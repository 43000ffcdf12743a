"""Build models, data and the trainer from the argument dataclasses; train; save the student and its card."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from bitdistill.audit import release_memory, tensorboard_into_output_dir
from bitdistill.convert import check_model_source, load_causal_lm, load_model
from bitdistill.data.tokenizer_check import check_tokenizer
from bitdistill.distill.args import (
    CacheArguments,
    DataArguments,
    EvalTaskArguments,
    LossArguments,
    ModelArguments,
)
from bitdistill.distill.attention import QKVCapture, resolve_layer_indices
from bitdistill.distill.card import distill_card
from bitdistill.distill.embeddings import freeze_embeddings, student_from_config, transfer_embeddings
from bitdistill.distill.layer_map import build_layer_map
from bitdistill.distill.plan import plan_recipe
from bitdistill.distill.teacher_cache import TeacherCache, cache_teacher_logits
from bitdistill.distill.trainer import PROJECTOR_ATTR, DistillationTrainer
from bitdistill.distill.warmup import QuantWarmup
from bitdistill.errors import UserError
from bitdistill.eval.perplexity import strided_perplexity
from bitdistill.export.memory import pack_in_memory
from bitdistill.io import atomic_output_dir, atomic_write
from bitdistill.models import tiny_tokenizer
from bitdistill.nn.replace import replace_linear_with_bitlinear, student_marker
from bitdistill.nn.subln import insert_subln
from bitdistill.runs import (
    CONFIG_FILE,
    build_blocks,
    check_run_folder,
    config_dict,
    record_provenance,
    setup_run,
)
from bitdistill.validate import validate_cache_args, validate_run_args

__all__ = ["load_teacher", "load_tokenizer", "prepare_student", "run_cache_teacher", "run_distillation"]

METRICS_FILE = "distill_metrics.json"
logger = logging.getLogger(__name__)

def load_tokenizer(model_args: ModelArguments):
    """The tokenizer: ``--tokenizer_name_or_path``, else the teacher's (folder, hub id or GGUF; a ``tiny:<arch>``
    model's is the byte-level :func:`~bitdistill.models.tiny_tokenizer`)."""
    from transformers import AutoTokenizer

    src, gguf = model_args.tokenizer_name_or_path, None
    if src is None:
        teacher = model_args.teacher_model_name_or_path
        src = teacher or model_args.student_model_name_or_path
        gguf = model_args.teacher_gguf_file if teacher else model_args.student_gguf_file
        if src is not None:
            check_model_source(src, gguf, "--teacher_gguf_file" if teacher else "--student_gguf_file")
    if src is None:
        raise UserError("no tokenizer to load; pass --tokenizer_name_or_path (or a teacher / student model)")
    if str(src).startswith("tiny:"):
        return tiny_tokenizer()
    return AutoTokenizer.from_pretrained(src, gguf_file=gguf)


def load_teacher(model_args: ModelArguments) -> nn.Module:
    """The frozen teacher in eval mode (optionally 8/4-bit on CUDA)."""
    src = model_args.teacher_model_name_or_path
    if src is None:
        raise UserError("pass --teacher_model_name_or_path (or --teacher_cache to train without a teacher)")
    check_model_source(src, model_args.teacher_gguf_file, "--teacher_gguf_file")
    if model_args.teacher_load_in_8bit or model_args.teacher_load_in_4bit:
        if not torch.cuda.is_available():
            raise UserError("--teacher_load_in_8bit/4bit need a CUDA device (bitsandbytes); load it in "
                            "--model_dtype bfloat16 on CPU instead")
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_8bit=model_args.teacher_load_in_8bit,
                               load_in_4bit=model_args.teacher_load_in_4bit)
        teacher = AutoModelForCausalLM.from_pretrained(src, gguf_file=model_args.teacher_gguf_file,
                                                       quantization_config=q, device_map={"": 0})
    else:
        teacher = load_causal_lm(src, gguf_file=model_args.teacher_gguf_file, dtype=model_args.model_dtype)
    teacher.requires_grad_(False)
    return teacher.eval()


def prepare_student(model_args: ModelArguments, teacher: nn.Module | None,
                    calibration_input_ids: torch.Tensor | None = None) -> nn.Module:
    """The BitNet student: a copy of the teacher (default), the given model or a fresh model from
    ``--student_config`` (optionally with the teacher's embeddings), converted, with optional SubLN and
    frozen embeddings/head. A student whose vocabulary is not the teacher's, or is too small for
    ``calibration_input_ids`` ``[B, T]`` (SubLN's calibrated init runs it on them), is refused first."""
    src = model_args.student_model_name_or_path
    if model_args.student_config and src is not None:
        raise UserError("--student_config builds a fresh student; do not also pass --student_model_name_or_path")
    if model_args.transfer_embeddings and not model_args.student_config:
        raise UserError("--transfer_embeddings applies to a fresh student; pass --student_config too")
    if model_args.transfer_embeddings and teacher is None:
        raise UserError("--transfer_embeddings needs the teacher's weights; drop --teacher_cache")
    if model_args.student_config:
        student = student_from_config(model_args.student_config, dtype=model_args.model_dtype)
        if model_args.transfer_embeddings:
            copied = transfer_embeddings(teacher, student)
            logger.info("copied the teacher's %s into the student", ", ".join(copied))
    elif src is None and teacher is not None and not getattr(teacher, "is_quantized", False):
        student = copy.deepcopy(teacher)
    else:
        src = src or model_args.teacher_model_name_or_path
        if src is None:
            raise UserError("pass --student_model_name_or_path (or a teacher to copy)")
        gguf = model_args.student_gguf_file if model_args.student_model_name_or_path else model_args.teacher_gguf_file
        check_model_source(src, gguf, "--student_gguf_file" if model_args.student_model_name_or_path else
                           "--teacher_gguf_file")
        student = load_model(src, gguf_file=gguf, dtype=model_args.model_dtype)
    if student_marker(student) is None:
        report = replace_linear_with_bitlinear(student, modules_to_not_convert=model_args.modules_to_not_convert)
        if not report.converted:
            raise UserError(f"the student {type(student).__name__} has no linear layer to convert")
    if teacher is not None and _vocab(teacher) != _vocab(student):
        raise UserError(f"teacher and student have different vocabularies ({_vocab(teacher)} vs {_vocab(student)} "
                        "output logits); distillation needs the same tokenizer and vocabulary")
    if model_args.subln and not (student_marker(student) or {}).get("subln_modules"):
        if calibration_input_ids is not None and int(calibration_input_ids.max()) >= _vocab(student):
            raise UserError(f"the tokenizer gives token id {int(calibration_input_ids.max())} but the student's "
                            f"vocabulary is {_vocab(student)}; they are incompatible (pass the model's own tokenizer)")
        insert_subln(student, eps=model_args.subln_eps, init=model_args.subln_init,
                     calibration_input_ids=calibration_input_ids)
    student.requires_grad_(True)
    if model_args.freeze_embeddings or model_args.freeze_lm_head:
        frozen = freeze_embeddings(student, embeddings=model_args.freeze_embeddings, lm_head=model_args.freeze_lm_head)
        logger.warning("frozen (not trained): %s", ", ".join(frozen))
    return student.train()


def _vocab(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    if head is None:
        raise UserError(f"{type(model).__name__} has no output head (get_output_embeddings() is None); distillation "
                        "needs a causal LM with one")
    return head.weight.shape[0]


def _own_tokenizer(model_args: ModelArguments):
    """The tokenizer stored in the teacher's (else the student's) local folder, when ``--tokenizer_name_or_path``
    names another one; ``None`` otherwise."""
    from transformers import AutoTokenizer

    if model_args.tokenizer_name_or_path is None:
        return None
    for src, gguf in ((model_args.teacher_model_name_or_path, model_args.teacher_gguf_file),
                      (model_args.student_model_name_or_path, model_args.student_gguf_file)):
        if src and gguf is None and (Path(src) / "tokenizer_config.json").is_file() and \
                Path(src).resolve() != Path(model_args.tokenizer_name_or_path).resolve():
            return AutoTokenizer.from_pretrained(src)
    return None


def _check_pair(teacher: nn.Module | None, student: nn.Module, tokenizer, max_seq_length: int,
                model_args: ModelArguments) -> None:
    model = teacher if teacher is not None else student
    check_tokenizer(tokenizer, model, tokenizer_name=str(model_args.tokenizer_name_or_path or "of the teacher"),
                    model_name=str(model_args.teacher_model_name_or_path or model_args.student_model_name_or_path
                                   or "the student"),
                    own_tokenizer=_own_tokenizer(model_args), from_model=model_args.tokenizer_name_or_path is None)
    if len(tokenizer) > _vocab(student):
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the student's vocabulary is {_vocab(student)}; "
                        "they are incompatible (pass the model's own tokenizer)")
    for who, m in (("teacher", teacher), ("student", student)):
        limit = getattr(getattr(m, "config", None), "max_position_embeddings", None)
        if limit is not None and max_seq_length > limit:
            raise UserError(f"--max_seq_length {max_seq_length} exceeds the {who}'s context of {limit} tokens")


def run_distillation(model_args: ModelArguments, data_args: DataArguments, loss_args: LossArguments,
                     training_args, task_args: EvalTaskArguments | None = None, *, command: str | None = None,
                     callbacks: list[TrainerCallback] | None = None) -> Path:
    """Distill and save the student to ``<output_dir>/student``; returns that folder.

    ``training_args`` is a ``transformers.TrainingArguments`` (its ``eval_strategy``/``eval_steps`` drive
    the perplexity evaluations; ``resume_from_checkpoint`` may be a checkpoint folder or ``latest``).
    ``task_args`` names lm-eval tasks run at the end on the teacher, the student and the packed student
    (checked before anything is loaded). ``callbacks`` are extra ``TrainerCallback`` objects.
    """
    task_args = task_args or EvalTaskArguments()
    if task_args.eval_tasks:
        from bitdistill.eval.harness import validate_tasks

        validate_tasks(task_args.eval_tasks, data_dir=task_args.eval_tasks_data_dir)
        if task_args.eval_tasks_batch_size < 1 or (task_args.eval_tasks_limit is not None
                                                   and task_args.eval_tasks_limit < 1):
            raise UserError("--eval_tasks_batch_size and --eval_tasks_limit must be >= 1")
    model_args, loss_args, plan = plan_recipe(model_args, loss_args)
    validate_run_args(model_args, data_args, loss_args, training_args)
    if loss_args.teacher_cache and (loss_args.hidden_weight > 0 or loss_args.attention_weight > 0):
        raise UserError("--teacher_cache replaces the teacher's logits only; hidden-state and attention losses "
                        "need the live teacher (pass --hidden_weight 0 --attention_weight 0: `bitdistill distill` turns "
                        "both on by default; or drop --teacher_cache)")
    output_dir = Path(training_args.output_dir)
    given_training_args = training_args.to_dict()
    final_dir = output_dir / "student"
    config = config_dict(model_args, data_args, loss_args, training_args=training_args)
    checkpoint = check_run_folder(training_args, config, final_dir)

    logger.info("loading the tokenizer and tokenizing the training text")
    tokenizer = load_tokenizer(model_args)
    blocks = build_blocks(data_args, tokenizer)
    logger.info("%d blocks of %d tokens (%d held out for validation)", blocks.shape[0], blocks.shape[1],
                data_args.validation_blocks)
    cache = TeacherCache(loss_args.teacher_cache) if loss_args.teacher_cache else None
    if cache is None:
        logger.info("loading the teacher %s%s", model_args.teacher_model_name_or_path,
                    f" ({model_args.teacher_gguf_file})" if model_args.teacher_gguf_file else "")
    teacher = None if cache is not None else load_teacher(model_args)
    torch.manual_seed(training_args.seed)
    student = prepare_student(model_args, teacher, calibration_input_ids=blocks[:1])
    if plan is not None:
        plan.record(student)
    logger.info("student ready: %s, %.1fM parameters", type(student).__name__,
                sum(p.numel() for p in student.parameters()) / 1e6)
    _check_pair(teacher, student, tokenizer, data_args.max_seq_length, model_args)
    if training_args.gradient_checkpointing and not getattr(student, "supports_gradient_checkpointing", False):
        raise UserError(f"--gradient_checkpointing: {type(student).__name__} does not support gradient "
                        "checkpointing; drop the flag (or lower --per_device_train_batch_size to save memory)")
    if cache is not None:
        cache.check_compatible(blocks, _vocab(student), loss_args.temperature)

    layer_map = None
    if loss_args.hidden_weight > 0:
        layer_map = build_layer_map(loss_args.hidden_layer_map, student.config.num_hidden_layers,
                                    teacher.config.num_hidden_layers)
        hs, ht = student.config.hidden_size, teacher.config.hidden_size
        if loss_args.hidden_projector or hs != ht:
            setattr(student, PROJECTOR_ATTR, nn.ModuleList(nn.Linear(hs, ht, bias=False) for _ in layer_map))
    attention_layers = None
    if loss_args.attention_weight > 0:
        ls, lt = student.config.num_hidden_layers, teacher.config.num_hidden_layers
        s_layers = resolve_layer_indices(loss_args.attention_layers, ls, "student")
        t_layers = [round(i * (lt - 1) / max(ls - 1, 1)) for i in s_layers]
        attention_layers = (s_layers, t_layers)
        for m, layers in ((student, s_layers), (teacher, t_layers)):  # unsupported blocks: refused before
            QKVCapture(m, layers)  # anything is written (the trainer builds its own captures)

    run = setup_run(blocks, tokenizer, data_args, training_args, config, callbacks)
    train_ds, val_ds, ppl_ids, audit, config_json = run.train_ds, run.val_ds, run.ppl_ids, run.audit, run.config_json
    if model_args.quant_warmup_steps > 0:
        run.callbacks.append(_WarmupCallback(QuantWarmup(student, model_args.quant_warmup_steps)))
    training_args = run.training_args
    trainer = DistillationTrainer(
        model=student, args=training_args, train_dataset=train_ds, teacher=teacher, teacher_cache=cache,
        loss_args=loss_args, hidden_layer_map=layer_map, attention_layers=attention_layers,
        perplexity_ids=ppl_ids, perplexity_window=data_args.max_seq_length, perplexity_stride=data_args.eval_stride,
        perplexity_max_windows=data_args.eval_max_windows, validation_dataset=val_ds, callbacks=run.callbacks)
    trainer.checkpoint_files = run.checkpoint_files
    tensorboard_into_output_dir(trainer)

    prov = None
    if trainer.is_world_process_zero():
        all_args = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args),
                    "loss": dataclasses.asdict(loss_args), "training": given_training_args,
                    "eval_tasks": dataclasses.asdict(task_args)}
        prov = record_provenance(output_dir, all_args, command, resumed=checkpoint is not None)
    metrics: dict[str, dict] = {"recipe": plan.as_dict()} if plan is not None else {}
    if ppl_ids is not None and teacher is not None and trainer.is_world_process_zero():
        r = strided_perplexity(teacher, ppl_ids, max_length=data_args.max_seq_length, stride=data_args.eval_stride,
                               max_windows=data_args.eval_max_windows)
        metrics["teacher"] = {"perplexity": r.perplexity, "tokens": r.num_tokens}
        logger.info("teacher perplexity: %.2f (%d tokens of --eval_files)", r.perplexity, r.num_tokens)
    if checkpoint is None and ppl_ids is not None:
        audit.evaluation_begins()
        metrics["student_start"] = trainer.evaluate(metric_key_prefix="start")
        _log_perplexity("student perplexity before training", metrics["student_start"].get("start_perplexity"))
    logger.info("training (%s)", f"{training_args.max_steps} steps" if training_args.max_steps > 0 else
                f"{training_args.num_train_epochs} epochs")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - started
    metrics["train"] = dict(result.metrics)
    if ppl_ids is not None:
        audit.evaluation_begins()
        metrics["student_end"] = trainer.evaluate(metric_key_prefix="final")
        _log_perplexity("student perplexity after training", metrics["student_end"].get("final_perplexity"))
    if trainer.is_world_process_zero():
        student = trainer.accelerator.unwrap_model(trainer.model)
        card_args = (model_args, data_args, loss_args, training_args)
        _save_student(student, tokenizer, final_dir, card_args, metrics, config_json, prov, train_seconds,
                      trainer.state.global_step)
        logger.info("saved the student to %s", final_dir)
        extra = _packed_and_task_metrics(student, teacher, tokenizer, ppl_ids, data_args, task_args)
        packed = extra.get("packed", {})
        if "perplexity" in packed:
            _log_perplexity("packed student perplexity", packed["perplexity"])
        elif "skipped" in packed:
            logger.info("packed student not evaluated: %s", packed["skipped"])
        if extra:  # the student is already safe on disk; now its metrics and card gain these results
            metrics.update(extra)
            _write_metrics_and_card(final_dir, card_args, metrics, prov, train_seconds, trainer.state.global_step)
    trainer.accelerator.wait_for_everyone()
    return final_dir


def _log_perplexity(what: str, value: float | None) -> None:
    if value is not None:
        logger.info("%s: %.2f", what, value)


def _packed_and_task_metrics(student: nn.Module, teacher: nn.Module | None, tokenizer, ppl_ids: torch.Tensor | None,
                             data_args: DataArguments, task_args: EvalTaskArguments) -> dict:
    """The packed student's perplexity and every model's downstream task results, as the card reads them.

    Returns ``{"packed": {"perplexity", "tokens"} or {"skipped": reason}}`` when there is anything to run on
    the packed student, and ``{"tasks": {"teacher"|"student"|"packed": {task: {metric: value}}}}`` with tasks.
    """
    if ppl_ids is None and not task_args.eval_tasks:
        return {}
    out: dict[str, dict] = {}
    try:
        packed = pack_in_memory(student)
    except ValueError as exc:
        packed, out["packed"] = None, {"skipped": str(exc)}
    if packed is not None and ppl_ids is not None:
        r = strided_perplexity(packed, ppl_ids, max_length=data_args.max_seq_length, stride=data_args.eval_stride,
                               max_windows=data_args.eval_max_windows)
        out["packed"] = {"perplexity": r.perplexity, "tokens": r.num_tokens}
    if task_args.eval_tasks:
        from bitdistill.eval.harness import evaluate_tasks

        models = {"teacher": teacher, "student": student, "packed": packed}
        out["tasks"] = {name: evaluate_tasks(m, tokenizer, task_args.eval_tasks, limit=task_args.eval_tasks_limit,
                                             batch_size=task_args.eval_tasks_batch_size,
                                             data_dir=task_args.eval_tasks_data_dir)
                        for name, m in models.items() if m is not None}
    del packed
    release_memory()
    return out


class _WarmupCallback(TrainerCallback):
    """Sets the quantization warm-up blend at the start of each optimizer step."""

    def __init__(self, warmup: QuantWarmup) -> None:
        self.warmup = warmup

    def on_step_begin(self, args, state, control, **kwargs):
        self.warmup.set_step(state.global_step)


def _save_student(student: nn.Module, tokenizer, out: Path, card_args: tuple, metrics: dict, config_json: str,
                  prov: dict | None, train_seconds: float, steps: int) -> None:
    projectors = getattr(student, PROJECTOR_ATTR, None)
    if projectors is not None:
        delattr(student, PROJECTOR_ATTR)
    card = distill_card(*card_args, metrics, prov, train_seconds, steps)
    with atomic_output_dir(out) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_FILE).write_text(config_json)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str))
        (tmp / "README.md").write_text(card)
    if projectors is not None:
        setattr(student, PROJECTOR_ATTR, projectors)


def _write_metrics_and_card(folder: Path, card_args: tuple, metrics: dict, prov: dict | None, train_seconds: float,
                            steps: int) -> None:
    """Replace the saved student's metrics file and model card, each atomically (temp file + rename)."""
    atomic_write(folder / METRICS_FILE, json.dumps(metrics, indent=2, default=str))
    atomic_write(folder / "README.md", distill_card(*card_args, metrics, prov, train_seconds, steps))


def run_cache_teacher(model_args: ModelArguments, data_args: DataArguments, cache_args: CacheArguments) -> Path:
    """Write the top-k teacher cache for the training blocks ``data_args`` describes."""
    validate_run_args(model_args, data_args)
    validate_cache_args(cache_args)
    tokenizer = load_tokenizer(model_args)
    blocks = build_blocks(data_args, tokenizer)
    teacher = load_teacher(model_args)
    _check_pair(None, teacher, tokenizer, data_args.max_seq_length, model_args)
    if torch.cuda.is_available() and not getattr(teacher, "is_quantized", False):
        teacher.cuda()
    return cache_teacher_logits(teacher, blocks, cache_args.cache_dir, top_k=cache_args.top_k,
                                temperature=cache_args.cache_temperature, batch_size=cache_args.cache_batch_size,
                                dtype=cache_args.cache_dtype, overwrite=cache_args.overwrite,
                                teacher_name=str(model_args.teacher_model_name_or_path))
