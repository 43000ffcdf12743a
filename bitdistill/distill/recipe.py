"""The recipe's parts for a run's architecture, decided before any work: which apply, which are skipped (one
printed line, recorded in the student's marker and model card), where the student will export to (one line).

``plan_recipe`` is called once at the start of ``bitdistill distill`` and ``bitdistill recover``. A part the
command's defaults turned on (``ModelArguments.recipe_defaults``, filled by the CLI) that the architecture cannot
take is switched off; one asked for explicitly is refused in one line (:func:`bitdistill.nn.arch.resolve_recipe_parts`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bitdistill.distill.args import LossArguments, ModelArguments
from bitdistill.errors import UserError
from bitdistill.export.targets import ExportTargets, export_targets
from bitdistill.nn.arch import RecipePlan, resolve_recipe_parts
from bitdistill.nn.config import MARKER_KEY, check_weight_scale, student_marker

__all__ = ["RunPlan", "plan_recipe"]

RECIPE_KEY = "recipe"  # in the student marker: {"skipped": {part: reason}, "exports": line}
# recipe part -> the option (of ModelArguments or LossArguments) that turns it on, and its "off" value
_OPTIONS = {"subln": ("subln", False), "attention": ("attention_weight", 0.0), "hidden": ("hidden_weight", 0.0)}


@dataclass(frozen=True)
class RunPlan:
    """A run's :class:`~bitdistill.nn.arch.RecipePlan` (per model it applies to) and its student's export targets."""

    recipe: RecipePlan
    targets: ExportTargets | None

    def as_dict(self) -> dict:
        """``{"skipped": {part: reason}, "exports": line}``: what the run's metrics and model card record."""
        return {"skipped": dict(self.recipe.skipped), "exports": self.targets.line() if self.targets else None}

    def record(self, student: nn.Module) -> None:
        """Write the skipped parts and the export line into ``student``'s marker (in place; kept with earlier ones)."""
        marker = student_marker(student)
        if marker is None:
            return
        setattr(student.config, MARKER_KEY, {**marker, RECIPE_KEY: self.as_dict()})


def _config(src, gguf_file: str | None = None, *, file_ok: bool = False):
    """The transformers config of a model source (folder, hub id, ``tiny:<arch>``, a config.json with ``file_ok``);
    ``None`` when it cannot be read here (the loaders later name the problem)."""
    from transformers import AutoConfig

    if src is None:
        return None
    src = str(src)
    if src.startswith("tiny:"):
        from bitdistill.models import tiny_config

        try:
            return tiny_config(src.split(":", 1)[1])
        except ValueError:
            return None
    path = Path(src)
    try:
        if file_ok and path.is_file():
            data = {k: v for k, v in json.loads(path.read_text()).items() if k != MARKER_KEY}
            return AutoConfig.for_model(**data)
        return AutoConfig.from_pretrained(src, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError, TypeError, ImportError):  # the loaders name the problem
        return None


def plan_recipe(model_args: ModelArguments, loss_args: LossArguments, *,
                log: Callable[[str], None] = print) -> tuple[ModelArguments, LossArguments, RunPlan | None]:
    """Resolve the recipe parts for the run's models; returns copies of the arguments with skipped parts off.

    The student's architecture (``--student_config``, else ``--student_model_name_or_path``, else the teacher's)
    decides SubLN; the attention relation and the hidden-state loss need both models. Prints one line naming the
    skipped default parts (if any) and one naming the formats the student will export to.

    Returns:
        ``(model_args, loss_args, plan)``; ``plan`` is ``None`` when no model config can be read before loading
        (the arguments are returned unchanged).

    Raises:
        UserError: a part asked for explicitly cannot apply (one line).
    """
    student_src = model_args.student_config or model_args.student_model_name_or_path
    student_cfg = (_config(model_args.student_config, file_ok=True) if model_args.student_config else
                   _config(student_src or model_args.teacher_model_name_or_path,
                           model_args.student_gguf_file if student_src else model_args.teacher_gguf_file))
    teacher_cfg = _config(model_args.teacher_model_name_or_path, model_args.teacher_gguf_file)
    check_weight_scale(model_args.weight_scale)
    if student_cfg is None:
        return model_args, loss_args, None
    marker = student_marker(student_cfg) or {}
    weight_scale = marker.get("weight_scale", "tensor") if marker else model_args.weight_scale
    if marker and model_args.weight_scale != "tensor" and weight_scale != model_args.weight_scale:
        raise UserError(f"--weight_scale {model_args.weight_scale}: the student {student_src} is already converted "
                        f"with weight_scale={weight_scale}; pass a plain model (or a teacher to copy) to convert anew")
    has_subln = bool(marker.get("subln_modules"))
    defaulted = set(model_args.recipe_defaults)
    on = {"subln": model_args.subln and not has_subln, "attention": loss_args.attention_weight > 0,
          "hidden": loss_args.hidden_weight > 0}
    requested = {part: (None if _OPTIONS[part][0] in defaulted else True) if wanted else False
                 for part, wanted in on.items()}
    plan = resolve_recipe_parts(student_cfg, requested)
    if teacher_cfg is not None and teacher_cfg.model_type != student_cfg.model_type:
        both = {p: h for p, h in requested.items() if p != "subln" and p in plan.applied}
        teacher_plan = resolve_recipe_parts(teacher_cfg, both)
        plan = RecipePlan(plan.architecture, tuple(p for p in plan.applied if p not in teacher_plan.skipped),
                          {**plan.skipped, **{p: f"the teacher ({teacher_cfg.model_type}): {why}"
                                              for p, why in teacher_plan.skipped.items()}})
    earlier = {p: why for p, why in ((marker.get(RECIPE_KEY) or {}).get("skipped") or {}).items() if p in _OPTIONS}
    plan = RecipePlan(plan.architecture, plan.applied, {**earlier, **plan.skipped})  # a resumed stage's student
    changes = {"model": {}, "loss": {}}
    for part in plan.skipped:
        option, off = _OPTIONS[part]
        changes["model" if option == "subln" else "loss"][option] = off
    model_args = dataclasses.replace(model_args, **changes["model"])
    loss_args = dataclasses.replace(loss_args, **changes["loss"])
    if plan.line():
        log(plan.line())
    targets = export_targets(student_cfg, subln=has_subln or "subln" in plan.applied, weight_scale=weight_scale)
    log(targets.line())
    return model_args, loss_args, RunPlan(plan, targets)
