"""GGUF export for llama.cpp: exact ternary codes and scales, the row fallback, the tokenizer, llama.cpp's own
greedy decode (through llama-cpp-python) against ``load_packed``'s, and every refusal as one line."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from bitdistill import insert_subln, replace_linear_with_bitlinear
from bitdistill.cli.main import main
from bitdistill.export import gguf as gguf_export
from bitdistill.export.memory import pack_in_memory
from bitdistill.export.writer import save_packed
from bitdistill.quant.reference import weight_quant

gguf = pytest.importorskip("gguf", reason="the GGUF export needs the gguf package: pip install 'bitdistill[gguf]'")

TEXT = ("The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building. It was the first "
        "structure in the world to surpass both the 200-metre and 300-metre mark in height. ") * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE tokenizer (GPT-2 pre-tokenizer), trained here on a short text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    fast.save_pretrained(out)
    return out


def _student(arch: str = "llama", hidden: int = 256, inter: int = 256, seed: int = 0, weight_scale: str = "tensor",
             **extra):
    """A random ternary student whose rows (in_features) are ``hidden`` / ``inter`` wide, with peaked logits."""
    from bitdistill.models import tiny_config

    cfg = tiny_config(arch)
    cfg.update({"vocab_size": 512, "hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": hidden // 4, "bos_token_id": 0, "eos_token_id": 0, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # large logit margins: greedy tokens robust to rounding
    replace_linear_with_bitlinear(model, weight_scale=weight_scale)
    return model


def _tokenizer(path: Path):
    return PreTrainedTokenizerFast.from_pretrained(path)


def _reader_tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_codes_and_scales_read_back_exactly(tmp_path, tokenizer_dir):
    model = _student()
    out = tmp_path / "m.gguf"
    report = gguf_export.save_gguf(model, out, tokenizer=_tokenizer(tokenizer_dir))
    assert report.ternary_share == 1.0 and all(layer.qtype == "TQ2_0" for layer in report.layers)
    tensors = _reader_tensors(out)
    n_head, n_kv = 4, 2
    for layer in report.layers:
        t = tensors[layer.tensor]
        assert t.tensor_type == gguf.GGMLQuantizationType.TQ2_0
        codes, gamma = weight_quant(model.get_submodule(layer.module).weight.detach())
        if layer.tensor.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp's interleaved RoPE row order
            codes = gguf_export._permute_rows(codes, n_head if "attn_q" in layer.tensor else n_kv)
        blocks = np.asarray(t.data).reshape(-1, 66)  # 64 bytes of 2-bit codes + float16 scale per 256 weights
        scales = blocks[:, 64:].copy().view(np.float16).astype(np.float32).ravel()
        block_codes = codes.reshape(-1, 256)
        nonzero = block_codes.abs().sum(1).numpy() > 0
        assert np.all(scales[nonzero] == np.float32(np.float16(gamma.item())))
        assert np.all(scales[~nonzero] == 0)
        values = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.TQ2_0).reshape(codes.shape)
        assert np.array_equal(np.sign(values), codes.numpy())


def test_tq1_0_codes_exact(tmp_path, tokenizer_dir):
    model = _student("qwen2")
    out = tmp_path / "m.gguf"
    report = gguf_export.save_gguf(model, out, tokenizer=_tokenizer(tokenizer_dir), gguf_type="tq1_0")
    tensors = _reader_tensors(out)
    for layer in report.layers:
        t = tensors[layer.tensor]
        assert t.tensor_type == gguf.GGMLQuantizationType.TQ1_0
        codes, _ = weight_quant(model.get_submodule(layer.module).weight.detach())
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(codes.shape)
        assert np.array_equal(np.sign(values), codes.numpy())
    assert "blk.0.attn_q.bias" in tensors  # qwen2's q/k/v biases, float32


def test_576_wide_student_falls_back_to_q8_0_and_reports_it(tmp_path, tokenizer_dir, capsys):
    model = _student(hidden=576, inter=1536)
    out = tmp_path / "m.gguf"
    report = gguf_export.save_gguf(model, out, tokenizer=_tokenizer(tokenizer_dir))
    kinds = {layer.module.rsplit(".", 1)[-1]: layer.qtype for layer in report.layers}
    assert kinds == {"q_proj": "Q8_0", "k_proj": "Q8_0", "v_proj": "Q8_0", "o_proj": "Q8_0", "gate_proj": "Q8_0",
                     "up_proj": "Q8_0", "down_proj": "TQ2_0"}
    down = 576 * 1536 * 2
    total = 2 * (576 * 576 * 2 + 576 * 288 * 2 + 3 * 576 * 1536)
    assert report.ternary_in_file == down and report.ternary_weights == total
    text = str(report)
    assert "in_features 576 % 256 != 0" in text and f"{down / total:.1%} of ternary weights stay ternary" in text
    tensors = _reader_tensors(out)
    q8 = tensors["blk.0.ffn_up.weight"]
    assert q8.tensor_type == gguf.GGMLQuantizationType.Q8_0
    codes, gamma = weight_quant(model.get_submodule("model.layers.0.mlp.up_proj").weight.detach())
    values = gguf.quants.dequantize(np.asarray(q8.data), q8.tensor_type).reshape(codes.shape)
    assert np.array_equal(np.sign(values), codes.numpy())
    assert np.allclose(values, codes.numpy() * gamma.item(), rtol=1e-3)


@pytest.mark.parametrize(("hidden", "qtype"), [(256, "TQ2_0"), (96, "Q8_0")])
def test_per_row_blocks_carry_their_rows_scale(tmp_path, tokenizer_dir, hidden, qtype):
    """A per-row student (BitNetConfig(weight_scale="row")): every 256-wide block (32-wide for the Q8_0 fallback) lies
    in one row and stores that row's scale, so the file holds T_r * gamma_r with gamma_r as a float16 block scale:
    ``f16(gamma_r)`` for TQ2_0, ``127 * f16(gamma_r / 127)`` for Q8_0 (as for a per-tensor student)."""
    model = _student(hidden=hidden, inter=hidden, weight_scale="row", num_hidden_layers=1)
    with torch.no_grad():
        for name, bl in model.named_modules():
            if name.endswith("proj"):
                bl.weight.mul_(torch.logspace(-1, 1, bl.weight.shape[0])[:, None])  # rows a hundredfold apart
    report = gguf_export.save_gguf(model, tmp_path / "m.gguf", tokenizer=_tokenizer(tokenizer_dir))
    tensors = _reader_tensors(tmp_path / "m.gguf")
    for layer in report.layers:
        assert layer.qtype == qtype
        t = tensors[layer.tensor]
        codes, gamma = weight_quant(model.get_submodule(layer.module).weight.detach(), per_row=True)
        if layer.tensor.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp's interleaved RoPE row order
            n = 4 if "attn_q" in layer.tensor else 2
            codes = gguf_export._permute_rows(codes, n)
            gamma = gguf_export._permute_rows(gamma[:, None], n)[:, 0]
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(codes.shape)
        g = gamma.numpy()[:, None]
        block_scale = (np.float16(g) if qtype == "TQ2_0" else np.float16(g / np.float32(127)) * np.float32(127))
        assert np.array_equal(values, codes.numpy() * block_scale.astype(np.float32))


def test_cli_strict_refuses_and_default_writes(tmp_path, tokenizer_dir, capsys):
    folder = tmp_path / "packed"
    save_packed(_student(hidden=576, inter=1536), folder, tokenizer=_tokenizer(tokenizer_dir))
    out = tmp_path / "m.gguf"
    assert main(["pack", str(folder), str(out), "--format", "gguf", "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--strict" in err and "in_features=576" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert main(["pack", str(folder), str(out), "--format", "gguf", "--gguf_type", "tq1_0"]) == 0
    printed = capsys.readouterr().out
    assert "-> blk.0.ffn_down.weight [576x1536] TQ1_0" in printed and "(in_features 576 % 256 != 0)" in printed
    assert out.is_file()


def _fail(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory, tokenizer_dir) -> Path:
    folder = tmp_path_factory.mktemp("packed") / "packed"
    save_packed(_student(), folder, tokenizer=_tokenizer(tokenizer_dir))
    return folder


def test_refusals_are_one_line(tmp_path, packed_dir, tokenizer_dir, capsys, monkeypatch):
    out = tmp_path / "m.gguf"
    assert "does not exist" in _fail(["pack", str(packed_dir), str(tmp_path / "nope" / "m.gguf"), "--format", "gguf"],
                                     capsys)
    out.write_bytes(b"old")
    assert "--overwrite" in _fail(["pack", str(packed_dir), str(out), "--format", "gguf"], capsys)
    assert out.read_bytes() == b"old"
    assert "OUT.gguf" in _fail(["pack", str(packed_dir), str(tmp_path / "m.bin"), "--format", "gguf"], capsys)
    # no llama.cpp mapping for OLMo here
    from bitdistill.models import tiny_model

    olmo = tiny_model("olmo")
    replace_linear_with_bitlinear(olmo)
    with pytest.raises(ValueError, match="no mapping here for model_type 'olmo'"):
        gguf_export.save_gguf(olmo, tmp_path / "n.gguf", tokenizer=_tokenizer(tokenizer_dir))
    # an in-layer RMSNorm in every BitLinear: no llama.cpp graph has it
    normed = _student()
    for m in normed.modules():
        if hasattr(m, "rms_norm") and type(m).__name__ == "BitLinear":
            from bitdistill.nn.bitlinear import BitRMSNorm

            m.rms_norm = BitRMSNorm(m.in_features, 1e-6)
    with pytest.raises(ValueError, match="in-layer RMSNorm"):
        gguf_export.save_gguf(normed, tmp_path / "r.gguf", tokenizer=_tokenizer(tokenizer_dir))
    # gguf not installed: names the extra
    import builtins

    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    assert "bitdistill[gguf]" in _fail(["pack", str(packed_dir), str(tmp_path / "g.gguf"), "--format", "gguf"], capsys)
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # only the pre-existing file


def test_subln_student_is_bitnet_or_refused(tmp_path, tokenizer_dir):
    """A SubLN student goes out as llama.cpp's bitnet graph through its BitNetForCausalLM form: a SubLN eps unlike
    rms_norm_eps is folded into the v/up scales; an untied head is refused in one line, before any file."""
    ok = _subln_student(1e-5)
    report = gguf_export.save_gguf(ok, tmp_path / "b.gguf", tokenizer=_tokenizer(tokenizer_dir))
    assert report.arch == "bitnet"
    names = set(_reader_tensors(tmp_path / "b.gguf"))
    assert {"blk.0.attn_sub_norm.weight", "blk.0.ffn_sub_norm.weight"} <= names and "output.weight" not in names
    assert gguf_export.save_gguf(_subln_student(1e-6), tmp_path / "c.gguf",
                                 tokenizer=_tokenizer(tokenizer_dir)).arch == "bitnet"
    untied = _student(rms_norm_eps=1e-5)
    insert_subln(untied, eps=1e-5, init="ones")
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        gguf_export.save_gguf(untied, tmp_path / "d.gguf", tokenizer=_tokenizer(tokenizer_dir))
    assert not (tmp_path / "d.gguf").exists()


@pytest.mark.parametrize("errno_known", [True, False])
def test_disk_full_leaves_nothing(errno_known, tmp_path, packed_dir, capsys, monkeypatch):
    import bitdistill.io

    def full(self, *args, **kwargs):
        self.fout[0].write(b"x" * 1000)
        if errno_known:
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(bitdistill.io, "_disk_full", lambda path: True)
        raise OSError("100000 requested and 8192 written")  # numpy.tofile on a full disk: no errno

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    err = _fail(["pack", str(packed_dir), str(tmp_path / "m.gguf"), "--format", "gguf"], capsys)
    assert f"cannot write {tmp_path / 'm.gguf'}: No space left on device" in err
    assert list(tmp_path.iterdir()) == []


def test_unknown_pre_tokenizer_is_refused(tmp_path, tokenizer_dir):
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    folder = tmp_path / "tok"
    folder.mkdir()
    for f in tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"pre-tokenizer .* is not one llama\.cpp reproduces"):
        gguf_export.save_gguf(_student(), tmp_path / "m.gguf", tokenizer=_tokenizer(folder))
    assert not (tmp_path / "m.gguf").exists()


# ---- llama.cpp itself (llama-cpp-python) ----


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'bitdistill[llama]'")


def _llama_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False, logits_all=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    out = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == n:
            break
    return out


def _subln_student(eps: float):
    """A tied Llama SubLN student (norm weights away from 1) whose rms_norm_eps is 1e-5."""
    model = _student(tie_word_embeddings=True, rms_norm_eps=1e-5)
    insert_subln(model, eps=eps, init="ones")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rms_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def test_packed_bitnet_model_exports_as_bitnet(tmp_path, tokenizer_dir):
    """`bitdistill pack` turns a SubLN student into BitNetForCausalLM; that packed model exports as bitnet too."""
    from bitdistill.export.bitnet_arch import subln_to_bitnet

    report = gguf_export.save_gguf(subln_to_bitnet(_subln_student(1e-6)), tmp_path / "b.gguf",
                                   tokenizer=_tokenizer(tokenizer_dir))
    assert report.arch == "bitnet" and report.ternary_share == 1.0
    names = set(_reader_tensors(tmp_path / "b.gguf"))
    assert {"blk.1.attn_sub_norm.weight", "blk.1.ffn_sub_norm.weight"} <= names


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "bitnet", "bitnet_packed"])
def test_llama_cpp_greedy_equals_load_packed(arch, tmp_path, tokenizer_dir):
    _llama_cpp()
    if arch == "bitnet_packed":  # SubLN eps != rms_norm_eps: the BitNet mapping rescales v/up, still exact
        from bitdistill.export.bitnet_arch import subln_to_bitnet

        model = reference = subln_to_bitnet(_subln_student(1e-6))
    elif arch == "bitnet":
        model = reference = _subln_student(1e-5)
    else:
        model = _student(arch)
        reference = pack_in_memory(model)
    out = tmp_path / "m.gguf"
    gguf_export.save_gguf(model, out, tokenizer=_tokenizer(tokenizer_dir))
    prompt = _tokenizer(tokenizer_dir)(TEXT[:60]).input_ids
    ours = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, min_new_tokens=16)
    assert _llama_greedy(out, prompt, 16) == ours[0, len(prompt):].tolist()


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_llama_cpp_tokenizes_like_transformers(pre, tmp_path, tokenizer_dir, shared_data):
    llama_cpp = _llama_cpp()
    spec = json.loads((shared_data / "tokenizers" / "smollm2" / "tokenizer.json").read_text())
    steps = [dict(s) for s in gguf_export.PRE_TOKENIZERS[pre]]
    for s in steps:
        if "regex" in s:
            s.update(pattern={"Regex": s.pop("regex")}, behavior="Isolated", invert=False)
        if s["type"] == "ByteLevel":
            s.setdefault("add_prefix_space", False)
            s["trim_offsets"] = True
    spec["pre_tokenizer"] = steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps}
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    cfg_src = shared_data / "tokenizers" / "smollm2" / "tokenizer_config.json"
    (folder / "tokenizer_config.json").write_bytes(cfg_src.read_bytes())
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    replace_linear_with_bitlinear(model)
    out = tmp_path / "t.gguf"
    gguf_export.save_gguf(model, out, tokenizer=tok)
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    text = (shared_data / "wikitext-2-raw-v1" / "wiki.test.raw").read_text()[:20000] + " 12345 3.14159  x\n\n y"
    want = tok(text, add_special_tokens=False).input_ids
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == want


# ---- GPT-NeoX and GPT-2: llama.cpp's gptneox and gpt2 graphs ----


def _layer_norm_student(arch: str, hidden: int, inter: int, seed: int = 0, keep: tuple[str, ...] = (), **extra):
    """A random ternary GPT-NeoX / GPT-2 student (4 heads, 2 blocks, 512-token vocabulary) with peaked logits; the
    ``keep`` modules stay in floating point."""
    from bitdistill.models import tiny_config

    cfg = tiny_config(arch)
    cfg.update({"vocab_size": 512, "hidden_size": hidden, "num_attention_heads": 4, "bos_token_id": 0,
                "eos_token_id": 0, ("n_inner" if arch == "gpt2" else "intermediate_size"): inter, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.5)  # large logit margins: greedy tokens robust to rounding
        for name, p in model.named_parameters():  # biases and norm weights that matter
            if name.endswith("bias"):
                p.uniform_(-0.2, 0.2)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
    replace_linear_with_bitlinear(model, modules_to_not_convert=["lm_head", *keep])
    return model


def _llama_logits(path: Path, prompt: list[int]) -> torch.Tensor:
    """llama.cpp's logits ``[len(prompt), vocab]`` for ``prompt`` (one batch, F32 KV cache)."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(prompt)
    return torch.tensor(np.asarray(llm.scores[:len(prompt)]))


# (hidden, intermediate, extra config): odd rows (every layer but ffn_down falls back to Q8_0; block 0's fused QKV
# kept in float; a tied GPT-NeoX head and its sequential residual) and 256-multiple rows (every layer TQ2_0)
SHAPES = {"odd": (192, 512, {"tie_word_embeddings": True, "use_parallel_residual": False}), "256": (256, 512, {})}
FLOAT_QKV = {"gpt_neox": "gpt_neox.layers.0.attention.query_key_value", "gpt2": "transformer.h.0.attn.c_attn"}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_layer_norm_students_run_in_llama_cpp(arch, shape, tmp_path, tokenizer_dir, capsys):
    """A GPT-NeoX / GPT-2 student exported (through `bitdistill pack` and its packed folder for 256-multiple rows):
    llama.cpp's logits are the student's to its activation rounding, and its greedy tokens are the student's."""
    _llama_cpp()
    hidden, inter, extra = SHAPES[shape]
    model = _layer_norm_student(arch, hidden, inter, keep=(FLOAT_QKV[arch],) if shape == "odd" else (),
                                **{k: v for k, v in extra.items() if arch == "gpt_neox"})
    out = tmp_path / "m.gguf"
    if shape == "256":  # the CLI on a packed folder (GPT-2's is the bitdistill extension): load_packed, then GGUF
        save_packed(model, tmp_path / "packed", tokenizer=_tokenizer(tokenizer_dir))
        assert main(["pack", str(tmp_path / "packed"), str(out), "--format", "gguf"]) == 0
        printed = capsys.readouterr().out
        assert f"llama.cpp arch {'gptneox' if arch == 'gpt_neox' else 'gpt2'}: 8 of 8 ternary layers as TQ2_0" in printed
        assert "100.0% of ternary weights stay ternary" in printed
    else:
        report = gguf_export.save_gguf(model, out, tokenizer=_tokenizer(tokenizer_dir))
        assert report.arch == ("gptneox" if arch == "gpt_neox" else "gpt2")
        kinds = {layer.qtype for layer in report.layers if not layer.tensor.endswith("ffn_down.weight")}
        assert kinds == {"Q8_0"} and all("in_features 192 % 256 != 0" in layer.reason
                                         for layer in report.layers if layer.qtype == "Q8_0")
        assert len(report.layers) == 7 and FLOAT_QKV[arch] not in {layer.module for layer in report.layers}
        assert {layer.qtype for layer in report.layers if layer.tensor.endswith("ffn_down.weight")} == {"TQ2_0"}
        assert 0 < report.ternary_share < 1
    tensors = _reader_tensors(out)
    assert ("output.weight" in tensors) == (arch == "gpt_neox")  # GPT-2's tied head is token_embd; NeoX needs one
    prompt = _tokenizer(tokenizer_dir)(TEXT[:60]).input_ids
    with torch.no_grad():
        ours = model(torch.tensor([prompt])).logits[0]
    theirs = _llama_logits(out, prompt)
    # llama.cpp rounds activations to int8 per 32 (Q8_0) or 256 (TQ2_0) values, the student per token: up to 1.3%
    # of the logits' standard deviation here; one block's QKV rows left per head is 37%
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0.05 * ours.std().item())
    greedy = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, min_new_tokens=16)
    assert _llama_greedy(out, prompt, 16) == greedy[0, len(prompt):].tolist()


def test_fused_qkv_stays_fused_with_its_codes(tmp_path, tokenizer_dir):
    """GPT-NeoX's per-head query_key_value rows go out as llama.cpp's [q; k; v] and GPT-2's Conv1D c_attn as
    [out, in]: one tensor each, the student's codes moved, never re-rounded, under its one scale."""
    for arch, module in (("gpt_neox", "gpt_neox.layers.1.attention.query_key_value"), ("gpt2", "transformer.h.1.attn.c_attn")):
        model = _layer_norm_student(arch, 256, 256)
        out = tmp_path / f"{arch}.gguf"
        gguf_export.save_gguf(model, out, tokenizer=_tokenizer(tokenizer_dir))
        t = _reader_tensors(out)["blk.1.attn_qkv.weight"]
        codes, gamma = weight_quant(model.get_submodule(module).weight_out_in().detach())
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(codes.shape)
        if arch == "gpt_neox":  # [heads, 3, head_dim] rows -> [3, heads, head_dim]
            codes = codes.reshape(4, 3, 64, 256).transpose(0, 1).reshape(768, 256)
        assert np.array_equal(np.sign(values), codes.numpy())
        assert np.all(np.abs(values[values != 0]) == np.float32(np.float16(gamma.item())))


@pytest.mark.parametrize(("arch", "extra", "match"), [
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scales attention scores by 1/sqrt"),
    ("gpt_neox", {"hidden_act": "relu"}, "GELU MLP, the model uses 'relu'"),
    ("gpt_neox", {"attention_bias": False}, "attention_bias=True"),
])
def test_layer_norm_graph_refusals_agree_with_the_targets_line(arch, extra, match, tmp_path, tokenizer_dir):
    from bitdistill.export.targets import export_targets

    model = _layer_norm_student(arch, 64, 128, **extra)
    with pytest.raises(ValueError, match=match) as info:
        gguf_export.save_gguf(model, tmp_path / "m.gguf", tokenizer=_tokenizer(tokenizer_dir))
    assert len(str(info.value).splitlines()) == 1 and not (tmp_path / "m.gguf").exists()
    targets = export_targets(model.config, subln=False)
    assert targets.gguf_arch is None and match in targets.llama_cpp


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_layer_norm_student_with_in_layer_norms_is_refused(arch, tmp_path, tokenizer_dir):
    """An in-layer RMSNorm in every BitLinear (use_rms_norm) has no place in llama.cpp's gptneox / gpt2 graphs."""
    from bitdistill.models import tiny_model

    model = tiny_model(arch)
    replace_linear_with_bitlinear(model, use_rms_norm=True)
    with pytest.raises(ValueError, match="in-layer RMSNorm") as info:
        gguf_export.save_gguf(model, tmp_path / "m.gguf", tokenizer=_tokenizer(tokenizer_dir))
    assert len(str(info.value).splitlines()) == 1 and list(tmp_path.iterdir()) == []
