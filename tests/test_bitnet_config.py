"""BitNetConfig (argument and saved marker), folder_kind, the PackedBitLinear factory, unique_tensors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bitdistill import (
    BitLinear,
    BitNetConfig,
    PackedBitLinear,
    bitnet_config,
    folder_kind,
    load_student,
    replace_linear_with_bitlinear,
    save_packed,
)
from bitdistill.models import tiny_model
from bitdistill.nn.subln import subln_module_names
from bitdistill.state_dict import unique_tensors


def _converted_names(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, BitLinear))


def test_config_is_frozen_and_validated():
    config = BitNetConfig(modules_to_not_convert=["lm_head", "q_proj"])
    assert config.modules_to_not_convert == ("lm_head", "q_proj")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.use_rms_norm = True
    with pytest.raises(TypeError, match="sequence of strings"):
        BitNetConfig(modules_to_not_convert="lm_head")
    with pytest.raises(ValueError, match="rms_norm_eps must be > 0"):
        BitNetConfig(rms_norm_eps=0.0)


def test_config_and_keywords_convert_identically():
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = replace_linear_with_bitlinear(a, BitNetConfig(modules_to_not_convert=("q_proj",), use_rms_norm=True))
    rb = replace_linear_with_bitlinear(b, modules_to_not_convert=["q_proj"], use_rms_norm=True)
    assert ra.converted == rb.converted and ra.skipped == rb.skipped
    assert a.config.bitdistill == b.config.bitdistill
    with pytest.raises(ValueError, match="either a BitNetConfig or its fields"):
        replace_linear_with_bitlinear(tiny_model("llama"), BitNetConfig(), use_rms_norm=True)


def test_marker_reads_back_as_the_config_that_reproduces_the_conversion():
    model = tiny_model("llama")
    replace_linear_with_bitlinear(model, BitNetConfig(modules_to_not_convert=("model.layers.1.mlp",)))
    config = bitnet_config(model)
    assert config.convert_output_head and "lm_head$" in config.modules_to_not_convert
    again = tiny_model("llama")
    replace_linear_with_bitlinear(again, config)
    assert _converted_names(again) == _converted_names(model)
    assert again.config.bitdistill == model.config.bitdistill
    assert bitnet_config(tiny_model("llama")) is None


def test_a_student_folder_written_before_bitnet_config_still_loads(tmp_path):
    """The on-disk marker (version 1) as earlier releases wrote it, SubLN included, converts the same layers."""
    model = tiny_model("llama")
    torch.manual_seed(0)
    replace_linear_with_bitlinear(model)
    subln = subln_module_names(model)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["bitdistill"] = {"format": "bitnet-b1.58-student", "version": 1, "use_rms_norm": False,
                         "rms_norm_eps": 1e-06, "modules_to_not_convert": ["lm_head"],
                         "subln_modules": subln, "subln_eps": 1e-05}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    state.update({f"{n}.rms_norm.weight": torch.full((model.get_submodule(n).in_features,), 0.5) for n in subln})
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    loaded = load_student(tmp_path)
    assert _converted_names(loaded) == _converted_names(model)
    for n in subln:
        norm = loaded.get_submodule(n).rms_norm
        assert norm.variance_epsilon == 1e-05 and torch.equal(norm.weight, torch.full_like(norm.weight, 0.5))
    assert bitnet_config(tmp_path).subln_modules == tuple(subln)


def test_folder_kind(tmp_path):
    plain = tiny_model("llama")
    plain.save_pretrained(tmp_path / "plain")
    student = tiny_model("llama")
    replace_linear_with_bitlinear(student)
    student.save_pretrained(tmp_path / "student")
    save_packed(student, tmp_path / "packed")
    assert folder_kind(tmp_path / "plain") == "plain"
    assert folder_kind(tmp_path / "student") == "student"
    assert folder_kind(tmp_path / "packed") == "packed"
    assert folder_kind(tmp_path / "missing") is None and folder_kind("tiny:llama") is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        folder_kind(tmp_path / "missing", required=True)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        folder_kind(tmp_path / "broken")


def test_packed_like_copies_the_geometry():
    layer = BitLinear(8, 12, bias=True, use_rms_norm=True, rms_norm_eps=1e-5)
    packed = PackedBitLinear.like(layer)
    assert (packed.in_features, packed.out_features) == (8, 12)
    assert packed.bias is not None and packed.rms_norm.variance_epsilon == 1e-5
    assert packed.weight.shape == (3, 8) and packed.weight.dtype == torch.uint8
    plain = PackedBitLinear.like(BitLinear(8, 4, bias=False))
    assert plain.bias is None and plain.rms_norm is None


def test_unique_tensors_keeps_the_first_name_of_shared_tensors():
    w = torch.randn(4, 3)
    empty = torch.empty(0)
    state = {"a": w, "b": torch.randn(2), "tied": w, "view": w[1:], "e1": empty, "e2": empty}
    out = unique_tensors(state)
    assert list(out) == ["a", "b", "view", "e1", "e2"]
    assert out["a"] is w
