"""``bitdistill pack`` / ``unpack``: summaries, exit codes, and every bad input (each leaves OUT absent, SRC intact)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitdistill.cli.main import main
from bitdistill.convert import convert_pretrained
from bitdistill.export import writer as writer_module
from bitdistill.models import tiny_model


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("src") / "student"
    convert_pretrained("tiny:llama", out)
    return out


def _fail(argv, capsys) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1, err
    return err


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_pack_student_prints_summary(student_dir, tmp_path, capsys):
    before = _digest(student_dir)
    assert main(["pack", str(student_dir), str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "source: BitNet student" in out and "packed 14 linear layers" in out and "bits/weight" in out
    assert "kept lm_head" in out and "other tensors in bfloat16" in out and "the same model in bf16" in out
    tensors = load_file(str(tmp_path / "p" / "model.safetensors"))  # default: unconverted tensors in bf16
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.uint8
    assert json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]["quant_method"] == "bitnet"
    assert _digest(student_dir) == before


def test_pack_dtype_and_shards(student_dir, tmp_path, capsys):
    assert main(["pack", str(student_dir), str(tmp_path / "p"), "--dtype", "bfloat16", "--max-shard-size", "50KB"]) == 0
    files = sorted(p.name for p in (tmp_path / "p").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "p" / "model.safetensors.index.json").is_file()
    tensors = {}
    for f in files:
        tensors.update(load_file(str(tmp_path / "p" / f)))
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.float32


def test_unpack_then_pack_gives_same_codes(student_dir, tmp_path, capsys):
    assert main(["pack", str(student_dir), str(tmp_path / "p")]) == 0
    assert main(["unpack", str(tmp_path / "p"), str(tmp_path / "s")]) == 0
    assert main(["pack", str(tmp_path / "s"), str(tmp_path / "p2")]) == 0
    a, b = load_file(str(tmp_path / "p" / "model.safetensors")), load_file(str(tmp_path / "p2" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if a[k].dtype == torch.uint8)


def test_from_plain_warns_and_skips_odd_layers(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=66, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "plain")
    err = _fail(["pack", str(tmp_path / "plain"), str(tmp_path / "p")], capsys)
    assert "--from_plain" in err and not (tmp_path / "p").exists()
    assert main(["pack", str(tmp_path / "plain"), str(tmp_path / "p"), "--from-plain"]) == 0
    captured = capsys.readouterr()
    assert "WARNING" in captured.err and "distill" in captured.err
    assert "gate_proj: out_features=66 is not a multiple of 4" in captured.out
    qc = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["lm_head", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]


def test_odd_out_features_student_refused(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bitdistill.nn import replace_linear_with_bitlinear

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=66, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    replace_linear_with_bitlinear(model)
    model.save_pretrained(tmp_path / "student")
    err = _fail(["pack", str(tmp_path / "student"), str(tmp_path / "p")], capsys)
    assert "mlp.gate_proj" in err and "multiple of 4" in err
    assert not (tmp_path / "p").exists() and not _leftovers(tmp_path)


def test_already_packed(student_dir, tmp_path, capsys):
    assert main(["pack", str(student_dir), str(tmp_path / "p")]) == 0
    err = _fail(["pack", str(tmp_path / "p"), str(tmp_path / "p2")], capsys)
    assert "already packed" in err


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_src_not_a_model(kind, tmp_path, capsys):
    src = tmp_path / "src"
    if kind == "empty":
        src.mkdir()
    elif kind == "file":
        src.write_text("hello")
    err = _fail(["pack", str(src), str(tmp_path / "p")], capsys)
    assert str(src) in err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("damage", ["truncate", "header", "missing_shard"])
def test_corrupt_safetensors(damage, student_dir, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(student_dir, src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "header":
        weights.write_bytes(b"\xff" * 16 + data[16:])
    else:
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    before = _digest(src)
    err = _fail(["pack", str(src), str(tmp_path / "p")], capsys)
    assert "model" in err and ("corrupt" in err or "missing" in err)
    assert not (tmp_path / "p").exists() and _digest(src) == before


@pytest.mark.parametrize("where", ["model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"])
def test_nan_weights(where, student_dir, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(student_dir, src)
    tensors = load_file(str(src / "model.safetensors"))
    tensors[where][0, 0] = float("nan") if "embed" in where else float("inf")
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    err = _fail(["pack", str(src), str(tmp_path / "p")], capsys)
    assert "NaN or Inf" in err and where.rpartition(".")[0] in err
    assert not (tmp_path / "p").exists()


def test_out_exists_needs_overwrite(student_dir, tmp_path, capsys):
    out = tmp_path / "p"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _fail(["pack", str(student_dir), str(out)], capsys)
    assert "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
    err = _fail(["pack", str(student_dir), str(out), "--overwrite"], capsys)  # not an earlier output
    assert "not an output" in err and (out / "keep.txt").read_text() == "mine"
    (out / "config.json").write_text("{}")
    assert main(["pack", str(student_dir), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_out_inside_src_refused(student_dir, capsys):
    before = _digest(student_dir)
    err = _fail(["pack", str(student_dir), str(student_dir), "--overwrite"], capsys)
    assert "source" in err and _digest(student_dir) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_mid_write_leaves_nothing(overwrite, student_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "p"
    if overwrite:
        assert main(["pack", str(student_dir), str(out)]) == 0
    out_before = _digest(out) if overwrite else None
    src_before = _digest(student_dir)
    real = writer_module.save_torch_state_dict

    def write_then_fail(tensors, folder, **kwargs):
        real(tensors, folder, **kwargs)
        assert any(Path(folder).iterdir())
        raise OSError("injected: disk full")

    monkeypatch.setattr(writer_module, "save_torch_state_dict", write_then_fail)
    with pytest.raises(OSError, match="injected"):
        main(["pack", str(student_dir), str(out), "--max-shard-size", "40KB"] + (["--overwrite"] if overwrite else []))
    assert _digest(student_dir) == src_before
    assert (_digest(out) == out_before) if overwrite else not out.exists()
    assert not _leftovers(tmp_path)


def test_gguf_file_missing(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    err = _fail(["pack", str(tmp_path / "src"), str(tmp_path / "p"), "--gguf-file", "model.gguf"], capsys)
    assert "model.gguf" in err


def test_unpack_rejects_student(student_dir, tmp_path, capsys):
    err = _fail(["unpack", str(student_dir), str(tmp_path / "s")], capsys)
    assert "not a packed" in err


def test_skip_rejected_for_student(student_dir, tmp_path, capsys):
    err = _fail(["pack", str(student_dir), str(tmp_path / "p"), "--skip", "q_proj"], capsys)
    assert "--skip" in err


def test_packed_model_output_equals_tiny_model_with_plain_pack(tmp_path, capsys):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "plain")
    assert main(["pack", str(tmp_path / "plain"), str(tmp_path / "p"), "--from-plain", "--skip", "lm_head",
                 "--skip", "model.layers.1"]) == 0
    qc = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.mlp.down_proj" in qc["modules_to_not_convert"]
    assert "model.layers.0.mlp.down_proj" not in qc["modules_to_not_convert"]


def test_bf16_baseline_counts_packed_layers_unpacked(student_dir, tmp_path):
    """The summary's bf16 size is the unpacked model's, whether packing a student or re-packing a packed model."""
    from bitdistill import load_packed, load_student, save_packed
    from bitdistill.export.folder import pack_pretrained

    student = load_student(student_dir)
    bf16 = sum(p.numel() * 2 for p in student.parameters())
    first = pack_pretrained(student_dir, tmp_path / "p", dtype="float32").report
    again = save_packed(load_packed(tmp_path / "p"), tmp_path / "p2")
    assert first.bf16_bytes == again.bf16_bytes == bf16
    assert first.bytes_after == again.bytes_after and first.float_dtype == again.float_dtype == "float32"
