"""``bitdistill cache-teacher``: run the teacher once and store its top-k logits for ``distill --teacher_cache``."""

from __future__ import annotations

import argparse

NAME = "cache-teacher"
HELP = ("Write the teacher's top-k log-probabilities (and the tail mass) on the training blocks to safetensors "
        "shards; `bitdistill distill --teacher_cache DIR` then trains without the teacher.")


def _types() -> tuple:
    from bitdistill.distill.args import CacheArguments, DataArguments, ModelArguments

    return (ModelArguments, DataArguments, CacheArguments)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bitdistill.cli.hfargs import add_dataclass_arguments

    add_dataclass_arguments(p, _types())


def run(args: argparse.Namespace) -> int:
    from bitdistill.cli.hfargs import parse_dataclasses
    from bitdistill.distill.run import run_cache_teacher

    model_args, data_args, cache_args = parse_dataclasses(args, _types())
    out = run_cache_teacher(model_args, data_args, cache_args)
    print(f"wrote the teacher cache to {out}")
    return 0
