"""``bitdistill self-distill``: build the model and its exits, train with ``SelfDistillTrainer``, save, reload.

Shares the run plumbing of ``distill`` (:mod:`bitdistill.runs`): token blocks and their cache (``DataArguments``),
checkpoint/resume validation (a resumed run must have the same configuration) and atomic output folders.

The output folder ``<output_dir>/model`` holds the causal LM as ``save_pretrained`` writes it (a
bitdistill student when trained with ``--bitnet``: ``load_student`` and ``bitdistill pack`` read it), the
exit modules that are not part of it (``exits.safetensors``: separate heads, the concat classifier,
hint bottlenecks), ``self_distill.json`` (the exit layout) and the metrics. :func:`load_multi_exit` rebuilds
the :class:`MultiExitLM` for early-exit decoding.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from bitdistill.audit import redact_command
from bitdistill.budget import CpuBudgetCallback, resumed_budget_state, run_budget
from bitdistill.convert import check_model_source, load_model, parse_dtype
from bitdistill.data.args import DataArguments
from bitdistill.data.tokenizer_check import check_tokenizer
from bitdistill.distill.args import BudgetArguments
from bitdistill.distill.engine import run_trainer
from bitdistill.errors import UserError
from bitdistill.io import atomic_output_dir
from bitdistill.models import tiny_tokenizer
from bitdistill.nn.replace import replace_linear_with_bitlinear, student_marker
from bitdistill.runs import (
    CONFIG_FILE,
    build_blocks,
    check_run_folder,
    config_dict,
    setup_run,
)
from bitdistill.selfdistill.args import EXIT_MODES, SelfDistillArguments, SelfDistillModelArguments
from bitdistill.selfdistill.exits import MultiExitLM
from bitdistill.selfdistill.loss import SelfDistillConfig, SelfDistillModel
from bitdistill.selfdistill.trainer import SelfDistillTrainer
from bitdistill.state_dict import unique_tensors
from bitdistill.validate import validate_data_args, validate_self_distill_args, validate_training_args

__all__ = ["EXITS_FILE", "LAYOUT_FILE", "build_self_distill_model", "load_multi_exit", "run_self_distillation"]

LAYOUT_FILE = "self_distill.json"
EXITS_FILE = "exits.safetensors"
METRICS_FILE = "self_distill_metrics.json"


def load_base_model(model_args: SelfDistillModelArguments) -> nn.Module:
    """The causal LM to train: pretrained (``model_name_or_path``) or fresh from ``model_config``, BitNet if asked."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (model_args.model_name_or_path is None) == (model_args.model_config is None):
        raise UserError("pass exactly one of --model_name_or_path (pretrained weights) and --model_config "
                        "(a config.json to train from scratch)")
    dtype = parse_dtype(model_args.model_dtype)
    if model_args.model_config is not None:
        path = Path(model_args.model_config)
        if not path.exists():
            raise FileNotFoundError(f"--model_config {path} does not exist; pass a config.json or a folder holding one")
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    else:
        model = load_model(model_args.model_name_or_path, gguf_file=model_args.gguf_file, dtype=dtype)
    if model_args.bitnet and student_marker(model) is None:
        report = replace_linear_with_bitlinear(model, modules_to_not_convert=model_args.modules_to_not_convert)
        if not report.converted:
            raise UserError(f"{type(model).__name__} has no linear layer to convert to BitLinear")
    return model.train()


def build_self_distill_model(model: nn.Module, sd_args: SelfDistillArguments) -> nn.Module:
    """The module the trainer optimizes: ``model`` itself for ``exit_variant="none"``, else a :class:`SelfDistillModel`."""
    if sd_args.exit_variant not in EXIT_MODES:
        raise UserError(f"unknown --exit_variant {sd_args.exit_variant!r}; choose one of {', '.join(EXIT_MODES)}")
    if sd_args.exit_variant == "none":
        return model
    config = SelfDistillConfig(alpha=sd_args.alpha, temperature=sd_args.temperature, hint_weight=sd_args.hint_weight,
                               exit_weights=sd_args.exit_weights)
    return SelfDistillModel(MultiExitLM(model, sd_args.exit_layers, sd_args.exit_variant), config)


def _own_tokenizer(model_args: SelfDistillModelArguments):
    """The tokenizer stored in the model's local folder when ``--tokenizer_name_or_path`` names another one."""
    from transformers import AutoTokenizer

    src, tok = model_args.model_name_or_path, model_args.tokenizer_name_or_path
    if tok is None or src is None or model_args.gguf_file is not None or \
            not (Path(src) / "tokenizer_config.json").is_file() or Path(src).resolve() == Path(tok).resolve():
        return None
    return AutoTokenizer.from_pretrained(src)


def _load_tokenizer(model_args: SelfDistillModelArguments):
    from transformers import AutoTokenizer

    src, gguf = model_args.tokenizer_name_or_path, None
    if src is None:
        if model_args.model_name_or_path is None:
            raise UserError("pass --tokenizer_name_or_path (a model built from --model_config has none)")
        if model_args.model_name_or_path.startswith("tiny:"):
            return tiny_tokenizer()
        src, gguf = model_args.model_name_or_path, model_args.gguf_file
        check_model_source(src, gguf, "--gguf_file")
    return AutoTokenizer.from_pretrained(src, gguf_file=gguf)


def run_self_distillation(model_args: SelfDistillModelArguments, sd_args: SelfDistillArguments,
                          data_args: DataArguments, training_args, budget_args: BudgetArguments | None = None, *,
                          command: str | None = None, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Train with exits and the self-distillation loss; save to ``<output_dir>/model`` and return that folder.

    ``training_args`` is a ``transformers.TrainingArguments``; its ``eval_steps`` (with ``eval_strategy``
    other than ``"no"``) schedule the per-exit evaluations, ``resume_from_checkpoint`` may be ``latest``.
    ``budget_args.time_budget`` trains for that much process CPU time instead of ``max_steps`` steps, the
    learning-rate schedule fit to the steps it buys (:class:`~bitdistill.budget.CpuBudgetCallback`).
    """
    validate_self_distill_args(model_args, sd_args)
    validate_data_args(data_args)
    validate_training_args(training_args)
    budget_args = budget_args or BudgetArguments()
    budget_s = run_budget(budget_args.time_budget, training_args)
    if sd_args.exit_variant == "concat" and sd_args.hint_weight > 0:
        raise UserError("feature hints need per-block exits, but --exit_variant concat has one fused classifier; "
                        "pass --hint_weight 0 or use --exit_variant shared/separate")

    if sd_args.exit_variant not in EXIT_MODES:
        raise UserError(f"unknown --exit_variant {sd_args.exit_variant!r}; choose one of {', '.join(EXIT_MODES)}")
    if training_args.gradient_checkpointing and sd_args.exit_variant != "none":
        raise UserError("--gradient_checkpointing is not supported with exits (they read every block's output "
                        "through hooks); drop it, or lower --per_device_train_batch_size to save memory")
    output_dir = Path(training_args.output_dir)
    given_training_args = training_args.to_dict()
    final_dir = output_dir / "model"
    config = config_dict(model_args, data_args, sd_args, training_args=training_args)
    checkpoint = check_run_folder(training_args, config, final_dir)
    resumed_budget_state(checkpoint, budget_s)  # a resume of another budget fails here, before any work
    tokenizer = _load_tokenizer(model_args)
    blocks = build_blocks(data_args, tokenizer)
    torch.manual_seed(training_args.seed)
    model = load_base_model(model_args)
    check_tokenizer(tokenizer, model, tokenizer_name=str(model_args.tokenizer_name_or_path or "of the model"),
                    model_name=str(model_args.model_name_or_path or model_args.model_config),
                    own_tokenizer=_own_tokenizer(model_args), from_model=model_args.tokenizer_name_or_path is None)
    module = build_self_distill_model(model, sd_args)
    eval_layers = sd_args.exit_layers if sd_args.exit_variant == "none" else None
    if eval_layers is not None:
        MultiExitLM(model, eval_layers)  # the layers evaluated through the model's own head must exist

    budget = [CpuBudgetCallback(budget_s)] if budget_s is not None else []
    run = setup_run(blocks, tokenizer, data_args, training_args, config, [*budget, *(callbacks or [])])
    trainer = SelfDistillTrainer(
        model=module, args=run.training_args, train_dataset=run.train_ds, validation_dataset=run.val_ds,
        perplexity_ids=run.ppl_ids, perplexity_window=data_args.max_seq_length, perplexity_stride=data_args.eval_stride,
        perplexity_max_windows=data_args.eval_max_windows, eval_exit_layers=eval_layers, callbacks=run.callbacks)
    all_args = {"model": dataclasses.asdict(model_args), "self_distill": dataclasses.asdict(sd_args),
                "data": dataclasses.asdict(data_args), "training": given_training_args,
                "budget": dataclasses.asdict(budget_args)}
    done = run_trainer(trainer, run, checkpoint=checkpoint, all_args=all_args, command=command,
                       evaluate=run.ppl_ids is not None or run.val_ds is not None)
    metrics: dict[str, dict] = {} if done.start is None else {"start": done.start}
    metrics["train"] = done.train
    metrics["log_history"] = [dict(h) for h in trainer.state.log_history]
    if done.final is not None:
        metrics["final"] = done.final
    train_seconds, config_json = done.train_seconds, run.config_json
    if trainer.is_world_process_zero():
        trained = trainer.accelerator.unwrap_model(trainer.model)
        with atomic_output_dir(final_dir) as tmp:
            save_multi_exit(trained, tmp, sd_args)
            tokenizer.save_pretrained(tmp)
            (tmp / CONFIG_FILE).write_text(config_json)
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str))
            (tmp / "README.md").write_text(_model_card(model_args, sd_args, data_args, metrics,
                                                       redact_command(command) if command else None,
                                                       train_seconds, trainer.state.global_step))
    trainer.accelerator.wait_for_everyone()
    return final_dir


def save_multi_exit(module: nn.Module, folder: Path, sd_args: SelfDistillArguments) -> None:
    """Write the causal LM (``save_pretrained``), the extra exit modules and the exit layout into ``folder``."""
    from safetensors.torch import save_file

    if isinstance(module, SelfDistillModel):
        mx = module.multi_exit
        mx.model.save_pretrained(folder)
        extra = {k: v.contiguous() for k, v in unique_tensors(module.state_dict()).items()
                 if not k.startswith("multi_exit.model.")}
        if extra:
            save_file(extra, str(folder / EXITS_FILE), metadata={"format": "pt"})
        layout = {"exit_variant": mx.variant, "exit_layers": mx.exit_layers,
                  "hint_bottlenecks": module.bottlenecks is not None}
    else:
        module.save_pretrained(folder)
        layout = {"exit_variant": "none", "exit_layers": sd_args.exit_layers, "hint_bottlenecks": False}
    (folder / LAYOUT_FILE).write_text(json.dumps(layout, indent=2))


def load_multi_exit(path: str | Path, *, dtype: str = "float32") -> MultiExitLM:
    """Rebuild the trained :class:`MultiExitLM` from a ``bitdistill self-distill`` output folder.

    A model trained with ``exit_variant="none"`` comes back with ``"shared"`` exits (its own head after each block).
    """
    from safetensors.torch import load_file

    path = Path(path)
    layout_file = path / LAYOUT_FILE
    if not layout_file.is_file():
        raise FileNotFoundError(f"{path} has no {LAYOUT_FILE}; pass the model folder `bitdistill self-distill` wrote")
    layout = json.loads(layout_file.read_text())
    model = load_model(path, dtype=dtype)
    variant = "shared" if layout["exit_variant"] == "none" else layout["exit_variant"]
    mx = MultiExitLM(model, layout["exit_layers"], variant)
    exits_file = path / EXITS_FILE
    if exits_file.is_file():
        state = {k.removeprefix("multi_exit."): v for k, v in load_file(str(exits_file)).items()
                 if k.startswith("multi_exit.")}
        missing, unexpected = mx.load_state_dict(state, strict=False)
        wanted = {k for k in mx.state_dict() if not k.startswith("model.")}
        if unexpected or wanted & set(missing):
            raise UserError(f"{exits_file} does not match the exit layout in {LAYOUT_FILE} "
                            f"(missing {sorted(wanted & set(missing))}, unexpected {sorted(unexpected)})")
    return mx.eval()


def _budget_line(train: dict) -> str:
    if "budget_cpu_s" not in train:
        return ""
    return (f"; a budget of {train['budget_cpu_s']:.0f} CPU-s ({train['train_cpu_s']:.0f} used, "
            f"{train['planned_steps']} steps planned)")


def _model_card(model_args, sd_args, data_args, metrics: dict, command: str | None, train_seconds: float,
                steps: int) -> str:
    source = model_args.model_name_or_path or f"random init from {model_args.model_config}"
    final = metrics.get("final", {})
    start = metrics.get("start", {})
    exits = [k.removeprefix("final_perplexity_") for k in final if k.startswith("final_perplexity_")]

    def fmt(d: dict, key: str) -> str:
        return f"{d[key]:.3f}" if key in d else "-"

    rows = [f"| {e} | {fmt(start, f'start_nll_{e}')} | {fmt(final, f'final_nll_{e}')} | "
            f"{fmt(final, f'final_perplexity_{e}')} | {fmt(final, f'final_loss_{e}')} |" for e in exits]
    table = "\n".join(["| exit | eval NLL before | eval NLL after | perplexity after | held-out loss after |",
                       "|---|---|---|---|---|", *rows]) if rows else "(no evaluation text given)"
    tags = "[self-distillation, early-exit, bitdistill" + (", bitnet, bitnet-b1.58]" if model_args.bitnet else "]")
    return f"""---
tags: {tags}
---
# Multi-exit model trained with `bitdistill self-distill`

Source: {source}; exits: `{sd_args.exit_variant}` after blocks {sd_args.exit_layers or 'all but the last'};
loss: "Be Your Own Teacher" (alpha {sd_args.alpha}, tau {sd_args.temperature}, hint weight {sd_args.hint_weight}).
Load it with `bitdistill.load_multi_exit(path)`; the folder is also a plain causal LM (the deepest exit).

- Command: `{command or '(library call)'}`
- Training data: {', '.join(data_args.train_files) or data_args.dataset_name}; blocks of {data_args.max_seq_length} tokens
- Steps: {steps}; {train_seconds:.0f} s{_budget_line(metrics.get("train", {}))}
- Provenance (versions, git commit, device, every argument): `provenance.json` next to the checkpoints;
  per-step time and memory: `audit_log.jsonl`

## Per-exit evaluation ({', '.join(data_args.eval_files) or '-'})

{table}
"""
