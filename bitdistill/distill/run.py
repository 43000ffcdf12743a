"""``bitdistill distill`` as a library call: load the models and the text from the argument dataclasses, run the
engine (:mod:`bitdistill.distill.engine`), save the student with its metrics and model card."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from bitdistill.audit import release_memory
from bitdistill.budget import resumed_budget_state, run_budget
from bitdistill.convert import check_model_source, load_causal_lm, load_model
from bitdistill.data.tokenizer_check import check_tokenizer
from bitdistill.distill.args import (
    BudgetArguments,
    CacheArguments,
    DataArguments,
    EvalTaskArguments,
    LossArguments,
    ModelArguments,
)
from bitdistill.distill.card import distill_card
from bitdistill.distill.embeddings import freeze_embeddings, student_from_config, transfer_embeddings
from bitdistill.distill.engine import Distilled, distill_student, save_student
from bitdistill.distill.recipe import plan_recipe
from bitdistill.distill.teacher_cache import TeacherCache, cache_teacher_logits
from bitdistill.distill.terms import validate_loss_args
from bitdistill.errors import UserError
from bitdistill.eval.perplexity import strided_perplexity
from bitdistill.export.memory import pack_in_memory
from bitdistill.io import atomic_write
from bitdistill.models import tiny_tokenizer
from bitdistill.nn.config import check_weight_scale
from bitdistill.nn.replace import replace_linear_with_bitlinear, student_marker
from bitdistill.nn.subln import insert_subln
from bitdistill.runs import CONFIG_FILE, build_blocks, check_run_folder, config_dict, recorded_config
from bitdistill.validate import validate_cache_args, validate_run_args

__all__ = ["METRICS_FILE", "StudentCard", "load_teacher", "load_tokenizer", "make_trainable",
           "packed_and_task_metrics", "prepare_student", "record_subln_eps", "resumed_subln_eps", "run_cache_teacher",
           "run_distillation"]

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
    check_weight_scale(model_args.weight_scale)
    if student_marker(student) is None:
        report = replace_linear_with_bitlinear(student, modules_to_not_convert=model_args.modules_to_not_convert,
                                               weight_scale=model_args.weight_scale)
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
    return make_trainable(student, model_args)


def resumed_subln_eps(model_args: ModelArguments, saved: dict | None) -> ModelArguments:
    """``model_args`` with the SubLN eps of the run being resumed, whose configuration is ``saved`` (``None``: a new
    run), when ``--subln_eps`` is not given: the eps it recorded. Runs from before the eps followed the model's
    ``rms_norm_eps`` recorded the old default, 1e-6, and resume with it; one that recorded ``None`` used the
    model's, the default now."""
    if not model_args.subln or model_args.subln_eps is not None or saved is None:
        return model_args
    eps = saved.get("subln_eps")
    return model_args if eps is None else dataclasses.replace(model_args, subln_eps=float(eps))


def record_subln_eps(model_args: ModelArguments, config: dict, student: nn.Module) -> tuple[ModelArguments, dict]:
    """``(model_args, config)`` with the SubLN eps ``student`` was given in place of the ``None`` that asked for the
    default, so the run's saved configuration records the eps it trained with and a resume reuses it
    (:func:`resumed_subln_eps`)."""
    eps = (student_marker(student) or {}).get("subln_eps")
    if not model_args.subln or model_args.subln_eps is not None or eps is None:
        return model_args, config
    return dataclasses.replace(model_args, subln_eps=float(eps)), {**config, "subln_eps": float(eps)}


def make_trainable(student: nn.Module, model_args: ModelArguments) -> nn.Module:
    """``student`` in training mode with every parameter trained except the embeddings/head the flags freeze."""
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
                     training_args, task_args: EvalTaskArguments | None = None,
                     budget_args: BudgetArguments | None = None, *, command: str | None = None,
                     callbacks: list[TrainerCallback] | None = None) -> Path:
    """Distill and save the student to ``<output_dir>/student``; returns that folder.

    Loads the tokenizer, the text, the teacher and the student, runs the engine
    (:func:`~bitdistill.distill.engine.distill_student`) and saves its result with a model card.
    ``training_args`` is a ``transformers.TrainingArguments`` (its ``eval_strategy``/``eval_steps`` drive
    the perplexity evaluations; ``resume_from_checkpoint`` may be a checkpoint folder or ``latest``).
    ``task_args`` names lm-eval tasks run at the end on the teacher, the student and the packed student
    (checked before anything is loaded). ``budget_args.time_budget`` trains for that much process CPU time
    instead of ``max_steps`` steps. ``callbacks`` are extra ``TrainerCallback`` objects.
    """
    task_args = task_args or EvalTaskArguments()
    budget_args = budget_args or BudgetArguments()
    if task_args.eval_tasks:
        from bitdistill.eval.harness import validate_tasks

        validate_tasks(task_args.eval_tasks, data_dir=task_args.eval_tasks_data_dir)
        if task_args.eval_tasks_batch_size < 1 or (task_args.eval_tasks_limit is not None
                                                   and task_args.eval_tasks_limit < 1):
            raise UserError("--eval_tasks_batch_size and --eval_tasks_limit must be >= 1")
    model_args, loss_args, plan = plan_recipe(model_args, loss_args)
    validate_run_args(model_args, data_args, training_args)
    validate_loss_args(loss_args)
    budget_s = run_budget(budget_args.time_budget, training_args)
    output_dir = Path(training_args.output_dir)
    given_training_args = training_args.to_dict()
    final_dir = output_dir / "student"
    model_args = resumed_subln_eps(model_args, recorded_config(training_args))
    config = config_dict(model_args, data_args, loss_args, training_args=training_args)
    checkpoint = check_run_folder(training_args, config, final_dir)
    resumed_budget_state(checkpoint, budget_s)  # a resume of another budget fails here, before any work

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
    model_args, config = record_subln_eps(model_args, config, student)
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

    all_args = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args),
                "loss": dataclasses.asdict(loss_args), "training": given_training_args,
                "eval_tasks": dataclasses.asdict(task_args), "budget": dataclasses.asdict(budget_args)}
    result = distill_student(student, teacher, blocks, tokenizer, data_args=data_args, loss_args=loss_args,
                             training_args=training_args, config=config, teacher_cache=cache, budget_s=budget_s,
                             checkpoint=checkpoint, quant_warmup_steps=model_args.quant_warmup_steps,
                             callbacks=callbacks, all_args=all_args, command=command)
    if plan is not None:
        result.metrics = {"recipe": plan.as_dict(), **result.metrics}
    if is_main_process(training_args):
        card = StudentCard(model_args, data_args, loss_args, training_args, result)
        save_student(result.student, tokenizer, final_dir, card.files(config))
        logger.info("saved the student to %s", final_dir)
        extra = packed_and_task_metrics(result.student, teacher, tokenizer, result.perplexity_ids, data_args,
                                        task_args)
        if extra:  # the student is already safe on disk; now its metrics and card gain these results
            result.metrics.update(extra)
            card.rewrite(final_dir)
    wait_for_everyone()
    return final_dir


def is_main_process(training_args) -> bool:
    """Whether this process writes the run's outputs (the first of a distributed run)."""
    return training_args.process_index == 0


def wait_for_everyone() -> None:
    """Every process of a distributed run waits here for the others (no-op in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def packed_and_task_metrics(student: nn.Module, teacher: nn.Module | None, tokenizer,
                            ppl_ids: torch.Tensor | None, data_args: DataArguments,
                            task_args: EvalTaskArguments) -> dict:
    """The packed student's perplexity of ``ppl_ids`` (``--eval_files``) and every model's downstream task results,
    as the card reads them.

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
        logger.info("packed student not evaluated: %s", exc)
    if packed is not None and ppl_ids is not None:
        r = strided_perplexity(packed, ppl_ids, max_length=data_args.max_seq_length, stride=data_args.eval_stride,
                               max_windows=data_args.eval_max_windows)
        out["packed"] = {"perplexity": r.perplexity, "tokens": r.num_tokens}
        logger.info("packed student perplexity: %.2f", r.perplexity)
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


@dataclasses.dataclass
class StudentCard:
    """A distilled student's configuration, metrics and model card, built from the run's arguments and result;
    ``sections`` are further markdown sections (e.g. ``recover``'s stage table) appended to the card."""

    model_args: ModelArguments
    data_args: DataArguments
    loss_args: LossArguments
    training_args: object
    result: Distilled
    sections: list[str] = dataclasses.field(default_factory=list)

    def text(self) -> str:
        r = self.result
        card = distill_card(self.model_args, self.data_args, self.loss_args, self.training_args, r.metrics,
                            r.provenance, r.train_seconds, r.steps)
        return "".join([card, *self.sections])

    def files(self, config: dict) -> dict[str, str]:
        """``{file name: text}`` of a student folder: run configuration, metrics, card."""
        return {CONFIG_FILE: json.dumps(config, indent=2), METRICS_FILE: self.metrics_json(), "README.md": self.text()}

    def metrics_json(self) -> str:
        return json.dumps(self.result.metrics, indent=2, default=str)

    def rewrite(self, folder: Path) -> None:
        """Replace a saved student's metrics file and card, each atomically (temp file + rename)."""
        atomic_write(folder / METRICS_FILE, self.metrics_json())
        atomic_write(folder / "README.md", self.text())


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
