"""`bitdistill convert`: library function and console script."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bitdistill import load_student, student_marker
from bitdistill.cli.main import main
from bitdistill.convert import convert_pretrained
from bitdistill.models import tiny_model


def test_convert_pretrained_folder(tmp_path):
    src = tmp_path / "src"
    tiny_model("qwen2").save_pretrained(src)
    report = convert_pretrained(src, tmp_path / "out", use_rms_norm=True)
    assert len(report.converted) == 14
    student = load_student(tmp_path / "out")
    assert student_marker(student)["use_rms_norm"] is True
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_cli_convert_and_refuse_overwrite(tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["convert", "tiny:llama", str(out)]) == 0
    assert "converted 14 linear layers" in capsys.readouterr().out
    before = (out / "model.safetensors").read_bytes()
    assert main(["convert", "tiny:llama", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["convert", "tiny:gpt2", str(out), "--overwrite"]) == 0
    assert student_marker(load_student(out)) is not None


@pytest.mark.parametrize("argv, message", [
    (["convert", "{tmp}/nope", "{tmp}/o"], "not a model folder"),
    (["convert", "tiny:bert", "{tmp}/o"], "unknown tiny architecture"),
    (["convert", "tiny:llama", "{tmp}/o", "--dtype", "int3"], "unknown dtype"),
])
def test_cli_errors_are_one_line(tmp_path, argv, message):
    (tmp_path / "nope").mkdir()
    argv = [a.format(tmp=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "bitdistill.cli.main", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
