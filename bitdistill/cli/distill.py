"""``bitdistill distill``: distill a full-precision teacher into a BitNet b1.58 student (transformers.Trainer)."""

from __future__ import annotations

import argparse


def _types() -> tuple:
    """The dataclasses of a distillation run (``run_distillation``'s positional arguments)."""
    from transformers import TrainingArguments

    from bitdistill.distill.args import DataArguments, EvalTaskArguments, ModelArguments
    from bitdistill.distill.terms import loss_arguments_type

    return (ModelArguments, DataArguments, loss_arguments_type(), TrainingArguments, EvalTaskArguments)


def _all_types() -> tuple:
    """:func:`_types` and the budget (``--time_budget``), every flag of the command."""
    from bitdistill.distill.args import BudgetArguments

    return (*_types(), BudgetArguments)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bitdistill.cli.hfargs import add_dataclass_arguments
    from bitdistill.distill.args import DISTILL_DEFAULTS

    add_dataclass_arguments(p, _all_types(), defaults=DISTILL_DEFAULTS)


def run(args: argparse.Namespace) -> int:
    from bitdistill.cli.console import show_progress
    from bitdistill.cli.hfargs import command_from_args, parse_dataclasses
    from bitdistill.distill.args import DISTILL_DEFAULTS
    from bitdistill.distill.run import run_distillation

    show_progress("distill")
    *run_args, budget_args = parse_dataclasses(args, _all_types(), defaults=DISTILL_DEFAULTS)
    out = run_distillation(*run_args, budget_args=budget_args, command=command_from_args(args))
    print(f"wrote the distilled student to {out}")
    return 0
