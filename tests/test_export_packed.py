"""Packed export: plain-transformers interoperability, load_packed, byte-identical re-pack, sharding, unpack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch._dynamo
from safetensors import safe_open
from safetensors.torch import load_file

from bitdistill import load_packed, pack_model, save_packed, unpack_to_student
from bitdistill.models import tiny_model
from bitdistill.nn import BitLinear, PackedBitLinear, replace_linear_with_bitlinear
from bitdistill.quant.packing import unpack_ternary
from bitdistill.quant.reference import weight_quant

ARCHS = ("llama", "qwen2", "phi3", "mistral")
# transformers' BitLinear wraps its quantizer in torch.compile, which takes about a minute on a 2-core CPU;
# the fast tests run it eagerly (same code, same math) and one slow test runs it compiled.
EAGER = {"TORCH_COMPILE_DISABLE": "1"}
NEW_TOKENS = 8

# Runs in a fresh interpreter that never imports bitdistill: what a user of plain transformers gets.
HF_ONLY = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    folders, ids_path, out_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    ids = torch.tensor(json.load(open(ids_path)))
    out = {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert type(model.model.layers[0].mlp.down_proj).__name__ == "BitLinear"
        with torch.no_grad():
            out[name + ".logits"] = model(ids).logits.contiguous()
            out[name + ".generate"] = model.generate(ids[:1], max_new_tokens=NEW_TOKENS, do_sample=False,
                                                     min_new_tokens=NEW_TOKENS).contiguous()
    assert not any(m == "bitdistill" or m.startswith("bitdistill.") for m in sys.modules), "bitdistill was imported"
    save_file(out, out_path)
""").replace("NEW_TOKENS", str(NEW_TOKENS))


def _student(arch: str, **kwargs):
    model = tiny_model(arch)
    replace_linear_with_bitlinear(model, **kwargs)
    return model


def _greedy(model, ids):
    with torch.no_grad():
        return model.generate(ids[:1], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.fixture(scope="module")
def packed_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    students, folders = {}, {}
    for arch in ARCHS:
        students[arch] = _student(arch)
        folders[arch] = root / arch
        save_packed(students[arch], folders[arch])
    return students, folders


@pytest.fixture(autouse=True)
def _eager_transformers():
    with torch._dynamo.config.patch(disable=True):
        yield


def _run_hf_only(folders: dict[str, Path], root: Path, env: dict[str, str]):
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    (root / "ids.json").write_text(json.dumps(ids.tolist()))
    proc = subprocess.run([sys.executable, "-c", HF_ONLY, json.dumps({a: str(f) for a, f in folders.items()}),
                           str(root / "ids.json"), str(root / "out.safetensors")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ids, load_file(str(root / "out.safetensors"))


@pytest.fixture(scope="module")
def hf_outputs(packed_folders, tmp_path_factory):
    return _run_hf_only(packed_folders[1], tmp_path_factory.mktemp("hf"), EAGER)


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_transformers_matches_student(arch, packed_folders, hf_outputs):
    students, _ = packed_folders
    ids, out = hf_outputs
    with torch.no_grad():
        ref = students[arch](ids).logits
    assert (out[f"{arch}.logits"] - ref).abs().max().item() <= 1e-4
    assert torch.equal(out[f"{arch}.generate"], _greedy(students[arch], ids))


@pytest.mark.slow
def test_plain_transformers_compiled_matches_student(packed_folders, tmp_path):
    students, folders = packed_folders
    ids, out = _run_hf_only({"llama": folders["llama"]}, tmp_path, {})
    with torch.no_grad():
        ref = students["llama"](ids).logits
    assert (out["llama.logits"] - ref).abs().max().item() <= 1e-4
    assert torch.equal(out["llama.generate"], _greedy(students["llama"], ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_load_packed_matches_student_and_repacks_identically(arch, packed_folders, hf_outputs, tmp_path):
    students, folders = packed_folders
    ids, out = hf_outputs
    model = load_packed(folders[arch])
    converted = [m for m in model.modules() if isinstance(m, PackedBitLinear)]
    assert len(converted) == sum(isinstance(m, BitLinear) for m in students[arch].modules())
    assert all(m.weight.dtype == torch.uint8 and m.weight_scale.dtype == torch.float32 for m in converted)
    with torch.no_grad():
        logits = model(ids).logits
        ref = students[arch](ids).logits
    # the student's epilogue uses the packed format's float order, so on CPU they agree bit for bit
    assert torch.equal(logits, ref)
    assert torch.equal(_greedy(model, ids), out[f"{arch}.generate"])
    save_packed(model, tmp_path / "again")
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "again" / f).read_bytes() == (folders[arch] / f).read_bytes(), f


def test_config_and_tensors(packed_folders):
    students, folders = packed_folders
    folder, student = folders["qwen2"], students["qwen2"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "bitnet", "linear_class": "bitlinear",
                                          "quantization_mode": "offline", "modules_to_not_convert": ["lm_head"]}
    assert "bitdistill" not in cfg
    tensors = load_file(str(folder / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # tied to the embedding, stored once
    q = student.model.layers[0].self_attn.q_proj
    codes, gamma = weight_quant(q.weight)
    assert torch.equal(unpack_ternary(tensors["model.layers.0.self_attn.q_proj.weight"]), codes)
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight_scale"], (1.0 / gamma).reshape(1))
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.bias"], q.bias)  # qwen2 attention bias
    card = (folder / "README.md").read_text()
    assert "14" in card and "bitnet" in card
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_pack_model_does_not_mutate_and_is_deterministic():
    student = _student("llama")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    a, b = pack_model(student), pack_model(student)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    assert a["model.layers.0.mlp.up_proj.weight"].shape == (128 // 4, 64)


def test_sharded_output_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    student = _student("llama")
    report = save_packed(student, tmp_path / "p", max_shard_bytes=60_000, dtype=torch.bfloat16)
    assert len(report.files) > 1
    index = json.loads((tmp_path / "p" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(report.files)
    assert index["metadata"]["total_size"] == report.bytes_after
    ids = torch.randint(3, 256, (1, 6))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "p", dtype="auto")(ids).logits  # as stored (4.x: float32)
        b = load_packed(tmp_path / "p")(ids).logits
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02)


def test_rms_norm_student_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    student = _student("llama", use_rms_norm=True, rms_norm_eps=1e-5)
    for m in student.modules():
        if isinstance(m, BitLinear):
            m.rms_norm.weight.data.uniform_(0.5, 1.5)
    save_packed(student, tmp_path / "p")
    qc = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert qc["use_rms_norm"] is True and qc["rms_norm_eps"] == 1e-5
    ids = torch.randint(3, 256, (1, 9))
    with torch.no_grad():
        ref = student(ids).logits
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "p", dtype=torch.float32)(ids).logits
        ours = load_packed(tmp_path / "p")(ids).logits
    assert (hf - ref).abs().max().item() <= 1e-4
    assert (ours - ref).abs().max().item() <= 1e-4


def test_unpack_to_student_round_trip(packed_folders, tmp_path):
    _, folders = packed_folders
    packed = load_packed(folders["llama"])
    student = unpack_to_student(packed)
    assert all(isinstance(m, BitLinear) for n, m in student.named_modules() if n.endswith("proj"))
    again = pack_model(student)
    original = load_file(str(folders["llama"] / "model.safetensors"))
    for key, t in original.items():
        if t.dtype == torch.uint8:
            assert torch.equal(again[key], t), key
        else:
            torch.testing.assert_close(again[key], t, rtol=1e-5, atol=0)
    ids = torch.randint(3, 256, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, packed(ids).logits, rtol=0, atol=5e-3)


def test_odd_out_features_student_refused(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=66, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    replace_linear_with_bitlinear(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.(gate|up)_proj.*multiple of 4"):
        save_packed(model, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_load_packed_rejects_non_packed(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a packed bitnet model"):
        load_packed(tmp_path / "plain")
    with pytest.raises(FileNotFoundError):
        load_packed(tmp_path / "missing")


def test_report_numbers(tmp_path):
    student = _student("llama")
    report = save_packed(student, tmp_path / "p")
    linears = [m for m in student.modules() if isinstance(m, BitLinear)]
    assert report.ternary_weights == sum(m.weight.numel() for m in linears)
    assert 2.0 < report.bits_per_weight < 2.1
    on_disk = sum(t.numel() * t.element_size() for t in load_file(str(tmp_path / "p" / "model.safetensors")).values())
    assert report.bytes_after == on_disk
    assert report.bytes_before == sum(p.numel() * 4 for p in student.parameters())
    assert Path(tmp_path / "p" / "generation_config.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "p" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_load_packed_keeps_only_packed_bytes(packed_folders):
    _, folders = packed_folders
    model = load_packed(folders["llama"])
    layers = [m for m in model.modules() if isinstance(m, PackedBitLinear)]
    resident = sum(m.weight.numel() * m.weight.element_size() + m.weight_scale.numel() * 4 for m in layers)
    bf16 = sum(m.in_features * m.out_features * 2 for m in layers)
    assert resident <= bf16 / 7
    assert not any(isinstance(t, torch.Tensor) and t.dtype != torch.uint8 and t.shape == (m.out_features, m.in_features)
                   for m in layers for t in vars(m).values())


def test_subln_student_given_to_save_packed_is_written_in_the_extension(tmp_path):
    """save_packed keeps the student's architecture: SubLN norms on two layers a block are the extension of the
    format (pack_pretrained writes a SubLN Llama as BitNetForCausalLM instead); load_packed runs it exactly."""
    from bitdistill.nn.subln import insert_subln

    student = _student("llama")
    insert_subln(student, init="ones")
    save_packed(student, tmp_path / "out")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["linear_class"] == "bitdistill" and qc["rms_norm_modules"] == sorted(
        n for n, m in student.named_modules() if getattr(m, "rms_norm", None) is not None)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(load_packed(tmp_path / "out", dtype="float32")(ids).logits, student(ids).logits,
                                   rtol=0, atol=0)
