"""``bitdistill self-distill``: train a causal LM with an exit after every block ("Be Your Own Teacher")."""

from __future__ import annotations

import argparse


def _types() -> tuple:
    from transformers import TrainingArguments

    from bitdistill.data.args import DataArguments
    from bitdistill.distill.args import BudgetArguments
    from bitdistill.selfdistill.args import SelfDistillArguments, SelfDistillModelArguments

    return (SelfDistillModelArguments, SelfDistillArguments, DataArguments, TrainingArguments, BudgetArguments)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bitdistill.cli.hfargs import add_dataclass_arguments

    add_dataclass_arguments(p, _types())


def run(args: argparse.Namespace) -> int:
    from bitdistill.cli.hfargs import command_from_args, parse_dataclasses
    from bitdistill.selfdistill.run import run_self_distillation

    model_args, sd_args, data_args, training_args, budget_args = parse_dataclasses(args, _types())
    out = run_self_distillation(model_args, sd_args, data_args, training_args, budget_args,
                                command=command_from_args(args))
    print(f"wrote the multi-exit model to {out}")
    return 0
