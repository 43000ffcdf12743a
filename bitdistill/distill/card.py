"""The model card (``README.md``) of a distilled student: Hub front matter, method, results table, provenance.

``metrics`` is the run's ``distill_metrics.json`` dict. The card reads, when present:

* ``metrics["teacher"]["perplexity"]``, ``metrics["student_start"]["start_perplexity"]``,
  ``metrics["student_end"]["final_perplexity"]``, ``metrics["packed"]["perplexity"]`` (or
  ``metrics["packed"]["skipped"]``, the reason the packed model was not evaluated);
* ``metrics["tasks"] = {model: {task: {metric: value}}}`` with ``model`` one of ``teacher``, ``student``,
  ``packed`` (downstream evaluations, e.g. lm-eval-harness results).

Every metric gets a row of the table (teacher, student before training, ternary student, packed
student); the student's own values go to the ``model-index`` of the YAML front matter.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import yaml

from bitdistill.distill.terms import describe_loss
from bitdistill.errors import UserError

__all__ = ["CARD_COLUMNS", "CARD_TAGS", "distill_card", "metric_rows", "model_card"]

CARD_TAGS = ["bitnet", "bitnet-b1.58", "1.58-bit", "ternary", "distillation", "bitdistill"]
CARD_COLUMNS = {"teacher": "teacher", "student_start": "student before training", "student": "ternary student",
                "packed": "packed student"}


def metric_rows(metrics: dict) -> dict[tuple[str, str], dict[str, float]]:
    """``{(dataset or task, metric): {column: value}}`` for every metric in ``metrics`` (columns: CARD_COLUMNS)."""
    rows: dict[tuple[str, str], dict[str, float]] = {}
    ppl = {"teacher": metrics.get("teacher", {}).get("perplexity"),
           "student_start": metrics.get("student_start", {}).get("start_perplexity"),
           "student": metrics.get("student_end", {}).get("final_perplexity"),
           "packed": metrics.get("packed", {}).get("perplexity")}
    ppl = {k: v for k, v in ppl.items() if v is not None}
    if ppl:
        rows[("eval text", "perplexity")] = ppl
    for model, tasks in metrics.get("tasks", {}).items():
        if model not in CARD_COLUMNS:
            raise UserError(f"task results for unknown model {model!r}; use one of {', '.join(CARD_COLUMNS)}")
        for task, values in tasks.items():
            for metric, value in values.items():
                rows.setdefault((task, metric), {})[model] = value
    return rows


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return "-" if x is None else str(x)


def _number(x) -> float | int | str:
    return x if isinstance(x, int) or (isinstance(x, float) and math.isfinite(x)) else str(x)


def _model_index(name: str, rows: dict, eval_dataset: str) -> list[dict]:
    results = []
    for (task, metric), values in rows.items():
        if "student" not in values:
            continue
        dataset = {"name": eval_dataset, "type": "text"} if task == "eval text" else {"name": task, "type": task}
        results.append({"task": {"type": "text-generation", "name": "Text Generation"}, "dataset": dataset,
                        "metrics": [{"type": metric, "value": _number(values["student"]), "name": metric}]})
    return [{"name": name, "results": results}] if results else []


def _table(rows: dict, packed_skipped: str | None, eval_dataset: str) -> str:
    used = [c for c in CARD_COLUMNS if c == "packed" or any(c in v for v in rows.values())]
    head = [CARD_COLUMNS[c] if c != "packed" or not packed_skipped else f"packed student (not evaluated: "
            f"{packed_skipped})" for c in used]
    lines = ["| dataset / task | metric | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(used)]
    for (task, metric), values in rows.items():
        label = eval_dataset if task == "eval text" else task
        lines.append(f"| {label} | {metric} | " + " | ".join(_fmt(values.get(c)) for c in used) + " |")
    return "\n".join(lines)


def model_card(metrics: dict, *, name: str, teacher: str, method: str, details: list[str], eval_dataset: str,
               command: str | None, provenance: dict | None = None, base_model: str | None = None,
               base_model_relation: str | None = None, datasets: list[str] | None = None) -> str:
    """The card's markdown, YAML front matter included.

    Args:
        metrics: the run's metrics (see the module docstring).
        name: the model's name (model-index name and title).
        teacher: how to name the teacher in the text.
        method: a few sentences on how the student was made.
        details: bullet lines (data, steps, options).
        eval_dataset: what the perplexity was measured on.
        command: the exact command (secrets already removed), or ``None`` for a library call.
        provenance: :func:`bitdistill.audit.provenance`'s dict, repeated at the end.
        base_model, base_model_relation: the Hub's ``base_model`` metadata; ``None`` leaves it out
            (e.g. a student that shares no weights with a teacher that is not on the Hub).
        datasets: Hub dataset ids the student was trained on.
    """
    rows = metric_rows(metrics)
    meta: dict = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": list(CARD_TAGS)}
    if base_model:
        meta["base_model"] = base_model
        if base_model_relation:
            meta["base_model_relation"] = base_model_relation
    if datasets:
        meta["datasets"] = list(datasets)
    index = _model_index(name, rows, eval_dataset)
    if index:
        meta["model-index"] = index
    packed_skipped = metrics.get("packed", {}).get("skipped")
    table = _table(rows, packed_skipped, eval_dataset) if rows else "(no evaluation was run)"
    parts = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", f"# {name}", "",
             f"BitNet b1.58 student (ternary weights, int8 activations) distilled from {teacher} by `bitdistill "
             "distill`.", "", "## Method", "", method, "", *[f"- {d}" for d in details], "", "## Results", "",
             table, "",
             "Ternary student: the latent-weight checkpoint in this folder, run with BitLinear layers "
             "(weights ternarized on the fly). Packed student: the same model packed in memory into the Hugging "
             "Face `bitnet` format (2-bit weights, `bitdistill pack`), evaluated the same way.", "",
             "## Reproduce", "", "```bash", command or "(library call, no command)", "```", ""]
    if provenance is not None:
        prov = {k: v for k, v in provenance.items() if k != "args"}
        parts += ["## Provenance", "", *[f"- {k}: `{v}`" for k, v in prov.items() if k != "command"], "",
                  "<details><summary>Every argument</summary>", "", "```json",
                  json.dumps(provenance.get("args", {}), indent=2), "```", "", "</details>", ""]
    parts += ["Full configuration: `distill_config.json`; all metrics: `distill_metrics.json`; run log: "
              "`audit_log.jsonl` and `provenance.json` in the output folder.", ""]
    return "\n".join(parts)


def _hub_id(src: str | None) -> str | None:
    """``src`` when it looks like a Hub repository id (``owner/name``, not a local path), else ``None``."""
    if not src or src.startswith("tiny:") or Path(src).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", src):
        return None
    return src


def _method(model_args, loss_args) -> str:
    if model_args.student_config:
        init = f"a fresh model built from the config `{model_args.student_config}`"
        if model_args.transfer_embeddings:
            init += " with the teacher's input embedding and output head copied in"
    elif model_args.student_model_name_or_path:
        init = f"`{model_args.student_model_name_or_path}`"
    else:
        init = "a copy of the teacher"
    extra = []
    if model_args.subln:
        extra.append("SubLN (an RMSNorm before every attention output and MLP down projection) was inserted")
    if model_args.quant_warmup_steps:
        extra.append(f"quantization was blended in over the first {model_args.quant_warmup_steps} steps")
    frozen = [n for n, f in (("input embedding", model_args.freeze_embeddings),
                             ("output head", model_args.freeze_lm_head)) if f]
    if frozen:
        extra.append(f"the {' and '.join(frozen)} stayed frozen")
    text = (f"The student started as {init}; every linear layer except `{'`, `'.join(model_args.modules_to_not_convert)}`"
            " was replaced by BitLinear (absmean ternary weights, per-token absmax int8 activations, straight-through "
            "gradients on latent full-precision weights). It was then trained to imitate the teacher by minimizing "
            + describe_loss(loss_args) + ", averaged over predicted tokens.")
    if extra:
        extra_text = "; ".join(extra)
        text += f" {extra_text[0].upper()}{extra_text[1:]}."
    return text


def distill_card(model_args, data_args, loss_args, training_args, metrics: dict, prov: dict | None,
                 train_seconds: float, steps: int) -> str:
    """The card of a ``bitdistill distill`` run from its argument dataclasses, metrics and provenance."""
    teacher = model_args.teacher_model_name_or_path or "(teacher cache)"
    if model_args.teacher_gguf_file:
        teacher += f" ({model_args.teacher_gguf_file})"
    if model_args.student_config:
        base, relation = None, None
    else:
        base = _hub_id(model_args.student_model_name_or_path or model_args.teacher_model_name_or_path)
        relation = "quantized" if base else None
    data = ", ".join(data_args.train_files) or f"{data_args.dataset_name} ({data_args.dataset_config_name})"
    gc_kwargs = getattr(training_args, "gradient_checkpointing_kwargs", None)
    details = [
        f"Training data: {data}; blocks of {data_args.max_seq_length} tokens",
        f"Steps: {steps}, batch {training_args.per_device_train_batch_size} x accumulation "
        f"{training_args.gradient_accumulation_steps} x {training_args.world_size} processes; {train_seconds:.0f} s",
        f"Learning rate {training_args.learning_rate:g} "
        f"({getattr(training_args.lr_scheduler_type, 'value', training_args.lr_scheduler_type)}), "
        f"seed {training_args.seed}",
        f"Gradient checkpointing: {bool(training_args.gradient_checkpointing)}"
        + (f" ({gc_kwargs})" if training_args.gradient_checkpointing and gc_kwargs else ""),
        f"Perplexity: window {data_args.max_seq_length}, stride {data_args.eval_stride or data_args.max_seq_length}, "
        f"max windows {data_args.eval_max_windows}",
    ]
    recipe = metrics.get("recipe") or {}  # bitdistill.distill.recipe: default parts skipped, export targets
    details += [f"Recipe part skipped for this architecture: {part} ({why})"
                for part, why in recipe.get("skipped", {}).items()]
    if recipe.get("exports"):
        details.append(recipe["exports"].capitalize())
    eval_name = ", ".join(Path(f).name for f in data_args.eval_files) or "-"
    student_name = Path(str(model_args.teacher_model_name_or_path or "student")).name
    return model_card(metrics, name=f"{student_name}-bitnet-b1.58-distilled", teacher=teacher,
                      method=_method(model_args, loss_args), details=details,
                      eval_dataset=eval_name, command=prov.get("command") if prov else None, provenance=prov,
                      base_model=base, base_model_relation=relation,
                      datasets=[data_args.dataset_name] if data_args.dataset_name else None)
