"""Helpers shared by the end-to-end training tests (distill, self-distill)."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import socket
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from bitdistill.models import tiny_config


class StopAt(TrainerCallback):
    """Stop training after optimizer step ``step`` and save a checkpoint there (an interrupted run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
            control.should_save = True
        return control


def parse_cli(command: str, argv: list[str]) -> tuple:
    """The argument dataclasses ``bitdistill <command> argv...`` would run with."""
    from bitdistill.cli.hfargs import parse_dataclasses
    from bitdistill.cli.main import build_parser

    module = importlib.import_module(f"bitdistill.cli.{command.replace('-', '_')}")
    return parse_dataclasses(build_parser().parse_args([command, *argv]), module._types())


def free_port() -> int:
    """A TCP port free on this machine now (for torch.distributed rendezvous in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_gpt2_vocab_folder(path: Path, arch: str, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A tiny ``arch`` model with the GPT-2 tokenizer's vocabulary, saved with that tokenizer into ``path``."""
    cfg = tiny_config(arch)
    cfg.vocab_size = 50257
    cfg.bos_token_id = cfg.eos_token_id = 50256
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # what a dataclass in the module looks itself up in
    spec.loader.exec_module(module)
    return module
