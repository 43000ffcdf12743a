"""Helpers shared by the end-to-end training tests (distill, self-distill)."""

from __future__ import annotations

import importlib
import socket

from transformers import TrainerCallback


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
