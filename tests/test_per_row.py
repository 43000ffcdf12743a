"""Per-row weight scales (``BitNetConfig(weight_scale="row")``): the quantizer, BitLinear's forward and STE backward,
conversion and its marker, the packed extension (``weight_scale [out]``), the native kernels and decoder, GGUF,
the export targets and the CLI flags. GGUF: ``test_export_gguf.py::test_per_row_blocks_carry_their_rows_scale``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitdistill import BitLinear, BitNetConfig, load_packed, ops, replace_linear_with_bitlinear, save_packed
from bitdistill.cli.main import main
from bitdistill.errors import UserError
from bitdistill.export.loader import unpack_to_student
from bitdistill.export.memory import pack_in_memory
from bitdistill.export.targets import PER_ROW_NOT_TRANSFORMERS, export_targets
from bitdistill.models import tiny_config, tiny_model
from bitdistill.nn.config import bitnet_config, student_marker
from bitdistill.nn.packed import PackedBitLinear
from bitdistill.quant.packing import pack_ternary, packed_linear_reference
from bitdistill.quant.reference import EPS, activation_quant, bitlinear_reference, weight_quant


def _rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ternarization as one per-tensor ternarization of each row (the definition)."""
    pairs = [weight_quant(row) for row in w]
    return torch.stack([c for c, _ in pairs]), torch.stack([g for _, g in pairs])


@pytest.mark.parametrize("shape", [(4, 1), (7, 13), (36, 72), (1, 300)])
def test_quantizer_is_the_per_tensor_one_row_by_row(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 4  # rows of very different magnitudes
    w[0] = 0.0  # an all-zero row: gamma clamps to eps, codes zero
    codes, gamma = weight_quant(w, per_row=True)
    want_codes, want_gamma = _rowwise(w)
    assert codes.dtype == torch.int8 and gamma.dtype == torch.float32 and gamma.shape == (shape[0],)
    assert torch.equal(codes, want_codes) and torch.equal(gamma, want_gamma)
    assert gamma[0] == EPS and not codes[0].any()
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    # per-tensor unchanged, and a tensor with equal row scales gives the same codes both ways
    same = torch.randn(1, shape[1]).sign().expand(shape).contiguous() * 0.25
    assert torch.equal(weight_quant(same, per_row=True)[0], weight_quant(same)[0])


def test_quantizer_refuses_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        weight_quant(torch.randn(2, 3, 4), per_row=True)


def test_weight_quant_per_row_op_schema_and_fake():
    w = torch.randn(12, 20)
    torch.library.opcheck(ops.weight_quant_per_row, (w,))
    codes, gamma = ops.weight_quant_per_row(w)
    assert torch.equal(codes, weight_quant(w, per_row=True)[0]) and gamma.shape == (12,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_bitlinear_forward_and_ste_gradients(dtype, bias):
    torch.manual_seed(1)
    layer = BitLinear(19, 12, bias=bias, dtype=dtype, per_row=True)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.1, 5, 12, dtype=dtype)[:, None])
    x = torch.randn(3, 5, 19, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 5, 12)
    assert torch.equal(y, bitlinear_reference(x, layer.weight, layer.bias, per_row=True))
    per_tensor = bitlinear_reference(x, layer.weight, layer.bias)
    assert not torch.equal(y, per_tensor)  # the scales differ row to row, so the outputs do
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    codes, gamma = weight_quant(layer.weight, per_row=True)
    w_q = (codes.float() * gamma[:, None]).to(dtype)
    xc, xs = activation_quant(x.detach().reshape(-1, 19))
    x_q = (xc.float() / xs).to(dtype)
    g = grad_y.reshape(-1, 12)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(x.grad.reshape(-1, 19), g @ w_q, **tol)
    torch.testing.assert_close(layer.weight.grad, g.t() @ x_q, **tol)
    if bias:
        torch.testing.assert_close(layer.bias.grad, g.sum(0), **tol)


def test_bitlinear_under_torch_compile():
    layer = BitLinear(16, 8, per_row=True)
    x = torch.randn(4, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), layer(x))


def test_config_validates_and_the_marker_round_trips():
    with pytest.raises(ValueError, match="weight_scale must be one of tensor, row"):
        BitNetConfig(weight_scale="channel")
    model = tiny_model("llama")
    replace_linear_with_bitlinear(model, weight_scale="row")
    bits = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert bits and all(m.per_row for m in bits) and "per-row" in repr(bits[0])
    assert student_marker(model)["weight_scale"] == "row"
    assert bitnet_config(model).weight_scale == "row"
    plain = tiny_model("llama")
    replace_linear_with_bitlinear(plain)
    assert "weight_scale" not in student_marker(plain)  # older students' markers read the same
    assert bitnet_config(plain).weight_scale == "tensor"
    with pytest.raises(UserError, match="already a BitLinear with weight_scale=row"):
        replace_linear_with_bitlinear(model)
    odd = {**student_marker(model), "weight_scale": "block"}
    with pytest.raises(UserError, match="weight_scale='block'"):
        bitnet_config({"bitdistill": odd})


def _student(arch: str, **kw):
    model = tiny_model(arch)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.5)  # peaked logits: greedy tokens are well defined
    replace_linear_with_bitlinear(model, weight_scale="row", **kw)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2", "gpt_neox"])
def test_pack_and_load_packed_give_the_students_logits(arch, tmp_path):
    student = _student(arch)
    ids = torch.randint(0, student.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    want = _logits(student, ids)
    save_packed(student, tmp_path / "p", dtype=torch.float32)
    qc = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert qc["linear_class"] == "bitdistill" and qc["weight_scale"] == "row"
    tensors = load_file(tmp_path / "p" / "model.safetensors")
    for name, m in student.named_modules():
        if isinstance(m, BitLinear):
            codes, gamma = weight_quant(m.weight_out_in(), per_row=True)
            assert tensors[f"{name}.weight_scale"].dtype == torch.float32
            assert torch.equal(tensors[f"{name}.weight_scale"], 1.0 / gamma)
            assert torch.equal(tensors[f"{name}.weight"], pack_ternary(codes))
    packed = load_packed(tmp_path / "p")
    layers = [m for m in packed.modules() if isinstance(m, PackedBitLinear)]
    assert layers and all(m.per_row and m.weight_scale.shape == (m.out_features,) for m in layers)
    assert torch.equal(_logits(packed, ids), want)
    assert torch.equal(_logits(pack_in_memory(student), ids), want)
    save_packed(packed, tmp_path / "again", dtype=torch.float32)  # byte for byte
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "p" / "model.safetensors").read_bytes()
    back = unpack_to_student(packed)
    assert bitnet_config(back).weight_scale == "row"
    torch.testing.assert_close(_logits(back, ids), want, atol=1e-5, rtol=0)


def test_subln_student_packs_into_the_extension(tmp_path):
    from bitdistill import insert_subln
    from bitdistill.export.folder import pack_pretrained

    student = _student("llama")
    insert_subln(student, init="ones")
    student.save_pretrained(tmp_path / "s")
    result = pack_pretrained(tmp_path / "s", tmp_path / "p", dtype="float32")
    assert "extension" in result.source_kind
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["quantization_config"]["weight_scale"] == "row"
    ids = torch.randint(0, 256, (1, 7))
    assert torch.equal(_logits(load_packed(tmp_path / "p"), ids), _logits(student, ids))


def _rewrite_scale(folder, key, value):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors[key] = value
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("bad", ["length", "nan", "negative", "matrix"])
def test_load_packed_validates_the_scales(tmp_path, bad):
    student = _student("llama")
    save_packed(student, tmp_path / "p", dtype=torch.float32)
    key = "model.layers.0.self_attn.q_proj.weight_scale"
    n = student.get_submodule("model.layers.0.self_attn.q_proj").out_features
    value = {"length": torch.ones(n - 1), "nan": torch.full((n,), float("nan")), "negative": -torch.ones(n),
             "matrix": torch.ones(n, 1)}[bad]
    _rewrite_scale(tmp_path / "p", key, value)
    with pytest.raises(UserError) as err:
        load_packed(tmp_path / "p")
    assert key in str(err.value) and "\n" not in str(err.value)


def test_a_per_tensor_folder_still_loads(tmp_path):
    model = tiny_model("llama").eval()
    replace_linear_with_bitlinear(model)
    save_packed(model, tmp_path / "p", dtype=torch.float32)
    packed = load_packed(tmp_path / "p")
    assert all(not m.per_row and m.weight_scale.shape == (1,) for m in packed.modules()
               if isinstance(m, PackedBitLinear))
    ids = torch.randint(0, 256, (1, 6))
    assert torch.equal(_logits(packed, ids), _logits(model, ids))


def test_native_kernel_applies_the_scale_per_output_row():
    from bitdistill import cpu_ext

    if not cpu_ext.native_available():
        pytest.skip(cpu_ext.native_unavailable_reason())
    torch.manual_seed(3)
    k = 67
    weights = []
    for n, bias in ((12, True), (8, False), (20, True)):
        codes = torch.randint(-1, 2, (n, k), dtype=torch.int8)
        scale = torch.rand(n) * 10 + 0.1
        weights.append((pack_ternary(codes), scale, torch.randn(n) if bias else None))
    weights.append((weights[0][0], torch.tensor([3.0]), None))  # a per-tensor layer beside them
    linears = cpu_ext.SharedInputPackedLinears(weights)
    for isa in cpu_ext.ISA_NAMES:
        with cpu_ext.forced_isa(isa):
            for m in (1, 3, 17):
                for dtype in (torch.float32, torch.bfloat16):
                    x = torch.randn(m, k, dtype=dtype)
                    for got, (p, s, b) in zip(linears(x), weights, strict=True):
                        assert torch.equal(got, packed_linear_reference(x, p, s, b)), (isa, m, dtype)
                        assert torch.equal(cpu_ext.packed_linear_cpu(x, p, s, b), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_decoder_runs_a_per_row_student(dtype):
    from bitdistill import FastDecoder, cpu_ext, generate_fast

    if not cpu_ext.native_available():
        pytest.skip(cpu_ext.native_unavailable_reason())
    packed = pack_in_memory(_student("llama")).to(dtype)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(5))
    native, eager = FastDecoder(packed, 16, backend="native", int8_head=False), FastDecoder(packed, 16, backend="torch")
    assert native.backend == "native"
    got, want = native.step(ids, 0), eager.step(ids, 0)
    tol = 1e-5 if dtype == torch.float32 else 2 * 2.0 ** -7  # as test_fast_decode: summation order only
    assert torch.isfinite(got).all()
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    full = _logits(packed, ids)[:, -1]
    assert (got.float() - full.float()).abs().max() <= tol * full.float().abs().max()
    if dtype == torch.float32:
        with torch.no_grad():
            expected = packed.generate(ids, do_sample=False, max_new_tokens=8, min_new_tokens=8)
        assert torch.equal(generate_fast(packed, ids, 8, int8_head=False), expected)


def test_export_targets_and_plain_transformers_refusal():
    cfg = tiny_config("llama")
    row = export_targets(cfg, subln=True, weight_scale="row")
    tensor = export_targets(cfg, subln=True)
    assert row.packed == "extension" and row.transformers == PER_ROW_NOT_TRANSFORMERS
    assert (row.llama_cpp, row.gguf_arch) == (tensor.llama_cpp, tensor.gguf_arch)
    assert "not plain transformers (per-row weight scales" in row.line()
    assert export_targets(cfg, subln=False).transformers is None


def test_plain_transformers_refuses_the_folder_in_one_line(tmp_path):
    from transformers import AutoModelForCausalLM

    save_packed(_student("llama"), tmp_path / "p", dtype=torch.float32)
    with pytest.raises(ValueError, match="linear_class"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "p")


def test_cli_flags(tmp_path, capsys):
    assert main(["convert", "tiny:llama", str(tmp_path / "s"), "--weight_scale", "row"]) == 0
    marker = json.loads((tmp_path / "s" / "config.json").read_text())["bitdistill"]
    assert marker["weight_scale"] == "row"
    capsys.readouterr()
    assert main(["convert", "tiny:llama", str(tmp_path / "t"), "--weight_scale", "rows"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--weight_scale must be one of tensor, row" in err and "\n" not in err
    assert not (tmp_path / "t").exists()
    assert main(["pack", str(tmp_path / "s"), str(tmp_path / "p"), "--dtype", "float32"]) == 0
    assert "extension" in capsys.readouterr().out
    assert load_packed(tmp_path / "p") is not None


def test_distill_flag_is_checked_before_any_work(tmp_path):
    from bitdistill.distill.args import LossArguments, ModelArguments
    from bitdistill.distill.recipe import plan_recipe

    args = ModelArguments(teacher_model_name_or_path="tiny:llama", weight_scale="per-row")
    with pytest.raises(UserError, match="--weight_scale must be one of"):
        plan_recipe(args, LossArguments(), log=lambda _: None)
    lines = []
    plan_recipe(ModelArguments(teacher_model_name_or_path="tiny:llama", weight_scale="row"), LossArguments(),
                log=lines.append)
    assert any(PER_ROW_NOT_TRANSFORMERS in line for line in lines)


def test_encoded_latent_weights_keep_codes_and_scale_in_every_row():
    from bitdistill.recover.ternary import encode_ternary

    torch.manual_seed(4)
    w = torch.randn(10, 33) * torch.logspace(-2, 1, 10)[:, None]
    codes, _ = weight_quant(w)  # e.g. a per-tensor fit, encoded for a per-row BitLinear
    codes[2] = 0
    latent = encode_ternary(codes, 0.07, w, per_row=True)
    got_codes, gamma = weight_quant(latent, per_row=True)
    assert torch.equal(got_codes, codes)
    used = codes.abs().sum(1) > 0
    assert 0 < used.sum() < 10  # rows with codes, and all-zero rows (the small ones, and row 2)
    torch.testing.assert_close(gamma[used], torch.full((int(used.sum()),), 0.07), atol=0, rtol=1e-6)
    assert (gamma[~used] == EPS).all()
    assert not latent[2].any()
    assert torch.equal(weight_quant(encode_ternary(codes, 0.07, w))[0], codes)  # per tensor unchanged


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_bitnet_form_of_a_per_row_subln_student_computes_the_same(arch):
    """llama.cpp's bitnet graph is reached through BitNetForCausalLM (subln_to_bitnet); fused Phi-3 projections split
    with their rows' scales."""
    from bitdistill import insert_subln
    from bitdistill.export.bitnet_arch import packs_as_bitnet, subln_to_bitnet

    student = _student(arch)
    insert_subln(student, init="ones")
    assert not packs_as_bitnet(student)  # pack writes the extension
    bitnet = subln_to_bitnet(student)
    layers = [m for m in bitnet.modules() if isinstance(m, PackedBitLinear)]
    assert layers and all(m.per_row for m in layers)
    ids = torch.randint(0, 256, (1, 7))
    torch.testing.assert_close(_logits(bitnet, ids), _logits(student, ids), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_recover_trains_and_packs_a_per_row_student(tmp_path, shared_data, capsys):
    from run_utils import tiny_gpt2_vocab_folder

    from bitdistill import load_student

    wiki = shared_data / "wikitext-2-raw-v1"
    (tmp_path / "train.txt").write_text((wiki / "wiki.train.prefix.raw").read_text()[:12000])
    teacher = tiny_gpt2_vocab_folder(tmp_path / "teacher", "llama", shared_data / "tokenizers" / "gpt2")
    out = tmp_path / "run"
    rc = main(["recover", "--teacher_model_name_or_path", str(teacher), "--train_files", str(tmp_path / "train.txt"),
               "--max_seq_length", "32", "--per_device_train_batch_size", "2", "--data_cache_dir", str(tmp_path / "c"),
               "--seed", "0", "--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "no",
               "--calibration_tokens", "256", "--calibration_seq_length", "32", "--held_out_blocks", "4",
               "--block_micro_batch", "4", "--block_fraction", "0.5", "--time_budget", "15s", "--block_steps", "3",
               "--block_init", "gptq", "--block_seq_length", "16", "--weight_scale", "row", "--output_dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert PER_ROW_NOT_TRANSFORMERS in capsys.readouterr().out  # the export line, before training
    student = load_student(out / "student").eval()
    assert all(m.per_row for m in student.modules() if isinstance(m, BitLinear))
    ids = torch.randint(0, 1000, (1, 12))
    assert torch.equal(_logits(pack_in_memory(student), ids), _logits(student, ids))


def test_fsdp_ternary_all_gather_keeps_per_row_layers_in_full_precision():
    from bitdistill.fsdp.ternary import _eligible, use_ternary_all_gather

    with pytest.raises(UserError, match="no eligible BitLinear"):
        use_ternary_all_gather(_student("llama"), world_size=1)
    assert "per-row" in _eligible(BitLinear(8, 4, per_row=True), 1)
    assert _eligible(BitLinear(8, 4), 1) is None
