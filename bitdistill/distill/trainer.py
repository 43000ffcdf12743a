"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss is the weighted sum of distillation terms.

Everything else (DDP/FSDP/DeepSpeed through accelerate, mixed precision, gradient accumulation,
checkpoints and resuming, logging, the progress bar) is the Trainer's.

Normalization. ``num_items_in_batch`` is the number of predicting positions (labels shifted by one, not
``-100``, not padding) in the whole accumulation window, summed over all ranks. Every term is
``sum over the micro-batch's valid tokens / num_items_in_batch``; since DDP averages gradients over ranks,
the loss is multiplied by the number of processes. The gradient is then that of the per-token mean over
the window, exactly as with one process and the equivalent batch.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from torch import nn

from bitdistill.distill.args import LossArguments
from bitdistill.distill.attention import QKVCapture
from bitdistill.distill.losses import prediction_mask
from bitdistill.distill.teacher_cache import TeacherCache
from bitdistill.distill.terms import LOSS_REGISTRY, LossInputs, active_terms, needed_outputs
from bitdistill.errors import UserError
from bitdistill.eval.perplexity import strided_perplexity
from bitdistill.runs import RunTrainer

__all__ = ["DistillationTrainer"]

PROJECTOR_ATTR = "bitdistill_projectors"


class DistillationTrainer(RunTrainer):
    """Trainer for a BitNet student distilled from a frozen teacher (or a teacher cache).

    Args:
        teacher: the frozen teacher (``None`` with ``teacher_cache``).
        teacher_cache: a :class:`TeacherCache` replacing the teacher's logits.
        loss_args: loss weights and options.
        hidden_layer_map: ``(student, teacher_indices)`` pairs for the hidden-state loss.
        attention_layers: ``(student_blocks, teacher_blocks)`` for the relation loss.
        **kwargs: :class:`~bitdistill.runs.RunTrainer` arguments (perplexity settings, ``validation_dataset``: held-out
            blocks for a distillation eval loss) and ``transformers.Trainer`` ones (``model`` is the student).
    """

    def __init__(self, *, teacher: nn.Module | None = None, teacher_cache: TeacherCache | None = None,
                 loss_args: LossArguments, hidden_layer_map: list | None = None,
                 attention_layers: tuple[list[int], list[int]] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if teacher is None and teacher_cache is None:
            raise UserError("DistillationTrainer needs a teacher or a teacher cache")
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
            if not getattr(teacher, "is_quantized", False):
                teacher.to(self.args.device)
        self.teacher_cache = teacher_cache
        self.loss_args = loss_args
        self.hidden_layer_map = hidden_layer_map
        self._captures = None
        if attention_layers is not None and "qkv" in needed_outputs(loss_args)[0]:
            self._captures = (QKVCapture(self.model, attention_layers[0]), QKVCapture(teacher, attention_layers[1]))
        # compute_loss divides by the accumulation window's token count (get_batch_samples), so the Trainer must
        # not divide by the accumulation steps again: it does not when the model "accepts loss kwargs" and a
        # count is given (the public switch from transformers 4.46 to today; 5.19+ also has loss_is_scaled_for_ga)
        self.model_accepts_loss_kwargs = True

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, torch.Tensor | None]:
        """The next ``num_batches`` micro-batches and the number of predicting positions in all of them, over all
        processes (see the module docstring)."""
        batch_samples = list(itertools.islice(epoch_iterator, num_batches))
        if not batch_samples or "labels" not in batch_samples[0]:
            return batch_samples, None
        n = sum(prediction_mask(b["labels"], b.get("attention_mask")).sum() for b in batch_samples)
        n = torch.as_tensor(n, device=device)
        if self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return batch_samples, n

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The weighted sum of the active loss terms (:mod:`bitdistill.distill.terms`); each forward produces only
        the outputs those terms need."""
        la = self.loss_args
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        block_index = inputs.pop("block_index", None)
        mask = prediction_mask(labels, inputs.get("attention_mask"))
        scale = 1.0
        if not model.training:  # an evaluation batch is normalized on its own (transformers may pass its own count)
            num_items_in_batch = None
        if num_items_in_batch is None:
            num_items_in_batch = mask.sum().clamp(min=1)
        elif self.accelerator.num_processes > 1:
            scale = float(self.accelerator.num_processes)
        terms = active_terms(la)
        if not terms:
            raise UserError("all loss weights are 0; set " + ", ".join(t.flag for t in LOSS_REGISTRY.values()))
        s_need, t_need = needed_outputs(la)
        s_cap, t_cap = self._captures if self._captures is not None else (None, None)
        with s_cap if s_cap is not None else contextlib.nullcontext():
            out = model(**inputs, output_hidden_states="hidden_states" in s_need)
        key_mask = inputs.get("attention_mask")
        x = LossInputs(logits=out.logits, labels=labels, mask=mask, num_items=num_items_in_batch,
                       student_logits=out.logits[:, :-1], key_mask=None if key_mask is None else key_mask[:, :-1])
        if "hidden_states" in s_need:
            x.student_hidden = [h[:, :-1] for h in out.hidden_states]
            x.layer_map = self.hidden_layer_map
            x.projectors = getattr(self.accelerator.unwrap_model(model), PROJECTOR_ATTR, None)
        if s_cap is not None:
            x.student_qkv = [q[:, :-1] for q in s_cap.states]
        if self.teacher_cache is not None and "logits" in t_need:
            dev = out.logits.device
            x.cached = tuple(t.to(dev) for t in self.teacher_cache.lookup(block_index.cpu()))
        elif t_need and self.teacher_cache is None:
            # the student's forward runs under accelerate's mixed precision (--bf16 / --fp16); so does the teacher's
            with torch.no_grad(), self.accelerator.autocast(), t_cap if t_cap is not None else contextlib.nullcontext():
                t_out = self.teacher(**inputs, output_hidden_states="hidden_states" in t_need)
            x.teacher_logits = t_out.logits[:, :-1]
            if "hidden_states" in t_need:
                x.teacher_hidden = [h[:, :-1] for h in t_out.hidden_states]
            if t_cap is not None:
                x.teacher_qkv = [q[:, :-1] for q in t_cap.states]
        parts = {t.name: t.loss(x, la) for t, _ in terms}
        loss = sum(w * parts[t.name] for t, w in terms) * scale
        if model.training:
            self.record_parts(parts, scale)
        return (loss, out) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Distillation loss on the validation blocks (if any) and strided perplexity of the student (if set)."""
        metrics: dict[str, float] = {}
        if self.perplexity_ids is not None:
            student = self.accelerator.unwrap_model(self.model)
            r = strided_perplexity(student, self.perplexity_ids, **self.perplexity_settings)
            metrics = {f"{metric_key_prefix}_perplexity": r.perplexity, f"{metric_key_prefix}_nll": r.nll,
                       f"{metric_key_prefix}_tokens": r.num_tokens}
            self.log(metrics)
        if self.validation_dataset is not None or eval_dataset is not None:
            # last, so that its on_evaluate callback event comes after the whole evaluation
            metrics.update(super().evaluate(eval_dataset or self.validation_dataset, ignore_keys, metric_key_prefix))
        elif metrics:
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
