"""``bitdistill cache-teacher``: run the teacher once and store its top-k logits for ``distill --teacher_cache``."""

from __future__ import annotations

import argparse


def _types() -> tuple:
    from bitdistill.distill.args import CacheArguments, DataArguments, ModelArguments

    return (ModelArguments, DataArguments, CacheArguments)


# The fields cache-teacher reads (the teacher, the tokenizer and the training blocks); the other fields of
# ModelArguments/DataArguments (student, SubLN, evaluation text, ...) are distill's and keep their defaults.
USED_FIELDS = frozenset({
    "teacher_model_name_or_path", "teacher_gguf_file", "teacher_load_in_8bit", "teacher_load_in_4bit",
    "tokenizer_name_or_path", "model_dtype",
    "train_files", "dataset_name", "dataset_config_name", "dataset_split", "text_column", "max_seq_length",
    "max_train_blocks", "data_cache_dir",
    "cache_dir", "top_k", "cache_temperature", "cache_batch_size", "cache_dtype", "overwrite",
})


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bitdistill.cli.hfargs import add_dataclass_arguments

    add_dataclass_arguments(p, _types(), only=USED_FIELDS, defaults=_defaults())


def _defaults() -> dict:
    """distill's block length, so that a cache made with the defaults serves a ``distill`` run with them."""
    from bitdistill.distill.args import DISTILL_DEFAULTS

    return {"max_seq_length": DISTILL_DEFAULTS["max_seq_length"]}


def run(args: argparse.Namespace) -> int:
    from bitdistill.cli.hfargs import parse_dataclasses
    from bitdistill.distill.run import run_cache_teacher

    model_args, data_args, cache_args = parse_dataclasses(args, _types(), defaults=_defaults())
    out = run_cache_teacher(model_args, data_args, cache_args)
    print(f"wrote the teacher cache to {out}")
    return 0
