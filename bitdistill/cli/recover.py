"""``bitdistill recover``: the staged recipe (calibrated init, block-wise reconstruction, e2e KD) in a CPU budget."""

from __future__ import annotations

import argparse


def _types() -> tuple:
    from transformers import TrainingArguments

    from bitdistill.distill.args import DataArguments, EvalTaskArguments, ModelArguments
    from bitdistill.distill.terms import loss_arguments_type
    from bitdistill.recover.staged import RecoverArguments

    return (ModelArguments, DataArguments, loss_arguments_type(), TrainingArguments, RecoverArguments, EvalTaskArguments)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bitdistill.cli.hfargs import add_dataclass_arguments
    from bitdistill.recover.staged import recover_defaults

    add_dataclass_arguments(p, _types(), defaults=recover_defaults())


def run(args: argparse.Namespace) -> int:
    from bitdistill.cli.hfargs import command_from_args, parse_dataclasses
    from bitdistill.recover.staged import recover_defaults, run_staged_recovery

    model_args, data_args, loss_args, training_args, recover_args, task_args = parse_dataclasses(
        args, _types(), defaults=recover_defaults())
    out = run_staged_recovery(model_args, data_args, loss_args, training_args, recover_args, task_args,
                              command=command_from_args(args))
    print(f"wrote the recovered student to {out}")
    return 0
