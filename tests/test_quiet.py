"""No false warnings: transformers' "weight unpacking" one under load_packed, torch's pin_memory one on CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from transformers import TrainingArguments

from bitdistill import save_packed
from bitdistill.data.args import DataArguments
from bitdistill.models import tiny_model
from bitdistill.nn import replace_linear_with_bitlinear
from bitdistill.runs import setup_run

UNPACKING = "slow because of weight unpacking"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is only given without a GPU")
def test_load_packed_drops_only_the_unpacking_warning(tmp_path):
    model = tiny_model("llama")
    replace_linear_with_bitlinear(model)
    save_packed(model, tmp_path / "packed")
    code = textwrap.dedent(f"""
        import sys
        from bitdistill import load_packed
        load_packed({str(tmp_path / "packed")!r})
        print("PLAIN", file=sys.stderr, flush=True)
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(tmp_path / "packed")!r})  # transformers' BitLinear does unpack
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"TORCH_COMPILE_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, _, after = proc.stderr.partition("PLAIN")
    assert UNPACKING not in before and UNPACKING in after


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinned memory is kept with an accelerator")
def test_no_pinned_memory_without_an_accelerator(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    assert args.dataloader_pin_memory
    run = setup_run(torch.zeros(4, 8, dtype=torch.long), None, DataArguments(max_seq_length=8, validation_blocks=1),
                    args, {}, None)
    assert run.training_args.dataloader_pin_memory is False and args.dataloader_pin_memory  # input not modified
    loader = torch.utils.data.DataLoader(run.train_ds, pin_memory=run.training_args.dataloader_pin_memory)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*pin_memory.*")
        next(iter(loader))
