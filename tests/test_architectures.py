"""Every listed architecture through the default recipe: recover, pack, load_packed; the export table of
docs/pack.md, cell by cell, against what the code does; the architecture table's lookups and discovery."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bitdistill import load_packed, load_student
from bitdistill.cli.main import main
from bitdistill.errors import UserError
from bitdistill.export import gguf as gguf_export
from bitdistill.export.bitnet_arch import split_fused
from bitdistill.export.folder import pack_pretrained
from bitdistill.export.targets import export_targets
from bitdistill.models import TINY_ARCHITECTURES, tiny_config, tiny_model
from bitdistill.nn import replace_linear_with_bitlinear
from bitdistill.nn.arch import SUPPORTED_ARCHITECTURES, fast_decode_unsupported, lookup, resolve_recipe_parts
from bitdistill.nn.fast_decode import FastDecoder
from bitdistill.nn.packed import PackedBitLinear
from bitdistill.nn.subln import insert_subln
from bitdistill.quant.packing import unpack_ternary

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"subln": None, "attention": None, "hidden": None}  # the recipe's defaults: on where they apply
IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
# recover end to end in the default suite for these (about 10 CPU-s each); the rest are marked slow
RECOVER_DEFAULT = ("gemma3", "gpt2")


def _rows() -> dict[str, dict[str, str]]:
    """docs/pack.md's architecture table: ``{row name: {column: cell}}``."""
    text = (ROOT / "docs" / "pack.md").read_text()
    block = text[text.index("| architecture | default recipe |"):].split("\n\n")[0].splitlines()
    header = [c.strip() for c in block[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells, strict=True))
            for cells in ([c.strip() for c in line.strip("|").split("|")] for line in block[2:])}


def _config(row: str):
    """The tiny config a table row names: ``<arch>`` or ``<arch>, tied`` (tied input and output embeddings)."""
    arch, _, variant = row.partition(", ")
    cfg = tiny_config(arch.strip("`"))
    if variant == "tied":
        cfg.tie_word_embeddings = True
    return cfg


def _student(cfg):
    """A tiny student of ``cfg`` with the default recipe's conversion and SubLN (where it applies)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    replace_linear_with_bitlinear(model)
    plan = resolve_recipe_parts(model, DEFAULTS)
    if "subln" in plan.applied:
        insert_subln(model, calibration_input_ids=IDS[:1])
        with torch.no_grad():  # make the norms matter
            for name, p in model.named_parameters():
                if ".rms_norm." in name:
                    p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))) + 0.5)
    return model, plan


def _gguf_tokenizer():
    """The tiny byte-level vocabulary as a tokenizer the GGUF export and llama.cpp accept: GPT-2's byte-level
    pre-tokenizer and one merge (llama.cpp needs merges), whose token takes the unused control byte 3's id."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from bitdistill.models import tiny_tokenizer

    tiny = tiny_tokenizer()
    spec = json.loads(tiny.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    del vocab[next(t for t, i in vocab.items() if i == 3)]
    vocab["ab"], spec["model"]["merges"] = 3, [["a", "b"]]
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="<pad>",
                                   bos_token="<s>", eos_token="<|endoftext|>")


def test_the_table_lists_every_tiny_architecture_and_each_has_an_entry():
    rows = _rows()
    assert {r.partition(",")[0].strip("`") for r in rows} == set(TINY_ARCHITECTURES)
    for arch in TINY_ARCHITECTURES:
        assert lookup(tiny_config(arch)) is SUPPORTED_ARCHITECTURES[tiny_config(arch).model_type]


@pytest.mark.parametrize("row", list(_rows()))
def test_table_cell_matches_the_code(row, tmp_path):
    """Each cell of docs/pack.md's table is what the code does for that tiny model: the recipe parts skipped, the
    packed folder's form (load_packed gives the student's logits), plain transformers loading it or refusing in
    one line, the GGUF export writing or refusing (llama.cpp running it where installed)."""
    cells = _rows()[row]
    cfg = _config(row)
    student, plan = _student(cfg)
    skipped = ", ".join(plan.skipped) or "-"
    assert cells["default recipe"] == ("all parts" if skipped == "-" else f"skips {skipped}"), cells
    targets = export_targets(cfg, subln="subln" in plan.applied)
    assert cells["packed folder"] == {"bitnet": "bitnet format", "bitnet-arch": "BitNetForCausalLM",
                                      "extension": "extension"}[targets.packed]
    assert cells["plain transformers"] == ("yes" if targets.transformers is None else "no")
    assert cells["llama.cpp"] == (f"yes ({targets.gguf_arch})" if targets.llama_cpp is None else "no")

    student.save_pretrained(tmp_path / "student")
    result = pack_pretrained(tmp_path / "student", tmp_path / "packed", dtype="float32")
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    form = ("extension" if config["quantization_config"]["linear_class"] == "bitdistill" else
            "bitnet-arch" if config["model_type"] == "bitnet" else "bitnet")
    assert form == targets.packed, result.source_kind
    with torch.no_grad():
        ref = student(IDS).logits
        torch.testing.assert_close(load_packed(tmp_path / "packed")(IDS).logits, ref, rtol=0, atol=1e-5)
        if targets.transformers is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plain = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.float32).eval()
            torch.testing.assert_close(plain(IDS).logits, ref, rtol=0, atol=1e-4)
        else:
            with pytest.raises(ValueError, match="linear_class"):
                AutoModelForCausalLM.from_pretrained(tmp_path / "packed")

    pytest.importorskip("gguf")
    out = tmp_path / "m.gguf"
    if targets.llama_cpp is not None:
        with pytest.raises(UserError) as info:
            gguf_export.save_gguf(student, out, tokenizer=None)
        assert len(str(info.value).splitlines()) == 1 and not out.exists()
        return
    report = gguf_export.save_gguf(student, out, tokenizer=_gguf_tokenizer())
    assert report.arch == targets.gguf_arch
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    prompt = IDS[0, :8].tolist()
    ours = student.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=6)
    theirs = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        theirs.append(token)
        if len(theirs) == 6:
            break
    assert theirs == ours[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a in RECOVER_DEFAULT else pytest.mark.slow)
                                  for a in TINY_ARCHITECTURES])
def test_recover_defaults_then_pack_then_load_packed(arch, tmp_path, shared_data, capsys):
    """``bitdistill recover`` with the recipe's defaults and a budget of seconds trains a tiny teacher of every
    listed architecture; its student packs and load_packed runs it (the fast decoder where the table says so), and
    the packed student goes to the GGUF graph the line printed before training named, where it named one."""
    (tmp_path / "train.txt").write_text((shared_data / "wikitext-2-raw-v1" / "wiki.train.prefix.raw").read_text()[:8000])
    out = tmp_path / "run"
    rc = main(["recover", "--teacher_model_name_or_path", f"tiny:{arch}", "--train_files", str(tmp_path / "train.txt"),
               "--max_seq_length", "32", "--per_device_train_batch_size", "2", "--calibration_tokens", "256",
               "--calibration_seq_length", "32", "--held_out_tokens", "64", "--block_micro_batch", "2",
               "--block_fraction", "0.5", "--time_budget", "4s", "--data_cache_dir", str(tmp_path / "cache"),
               "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    plan = resolve_recipe_parts(tiny_config(arch), DEFAULTS)
    assert ("recipe parts skipped" in captured.out) == bool(plan.skipped)
    targets = export_targets(tiny_config(arch), subln="subln" in plan.applied)
    assert targets.line() in captured.out
    student = load_student(out / "student")
    assert bool(json.loads((out / "student" / "config.json").read_text())["bitdistill"].get("subln_modules")) == (
        "subln" in plan.applied)
    pack_pretrained(out / "student", tmp_path / "packed", dtype="float32")
    packed = load_packed(tmp_path / "packed")
    with torch.no_grad():
        torch.testing.assert_close(packed(IDS).logits, student(IDS).logits, rtol=0, atol=1e-5)
        greedy = packed.generate(IDS[:1], do_sample=False, max_new_tokens=5, min_new_tokens=5)
    why = fast_decode_unsupported(packed)  # the torch path (the model's own generate) otherwise, with this line
    if why is None:
        # the model's own head: the int8 head is approximate, and a student of a few seconds has near-tied logits
        decoder = FastDecoder(packed, max_length=IDS.shape[1] + 5, int8_head=False)
        assert decoder.generate(IDS[:1], max_new_tokens=5).tolist() == greedy.tolist()
        assert FastDecoder(packed, max_length=IDS.shape[1] + 5).generate(IDS[:1], max_new_tokens=5).shape == greedy.shape
    else:
        assert len(why.splitlines()) == 1 and packed.config.model_type in why
        with pytest.raises(UserError, match=r"use model\.generate"):
            FastDecoder(packed, max_length=IDS.shape[1] + 5)
    if targets.llama_cpp is None:
        pytest.importorskip("gguf")
        assert gguf_export.save_gguf(packed, tmp_path / "m.gguf", tokenizer=_gguf_tokenizer()).arch == targets.gguf_arch


def test_fused_projection_splits_bit_exactly():
    """A Phi-3 qkv_proj split for BitNetForCausalLM: every part keeps the fused tensor's scale, so the parts' codes
    are the fused codes row for row and their outputs are the fused output's slices, bit for bit."""
    model = tiny_model("phi3")
    replace_linear_with_bitlinear(model)
    fused = model.model.layers[0].self_attn.qkv_proj
    with torch.no_grad():
        fused.weight.mul_(torch.rand(fused.weight.shape, generator=torch.Generator().manual_seed(1)) * 3)
    packed = PackedBitLinear.from_bitlinear(fused)
    sizes = [64, 32, 32]
    parts = split_fused(fused, sizes)
    assert torch.equal(torch.cat([unpack_ternary(p.weight, torch.int8) for p in parts]),
                       unpack_ternary(packed.weight, torch.int8))
    assert all(torch.equal(p.weight_scale, packed.weight_scale) for p in parts)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert torch.equal(torch.cat([p(x) for p in parts], dim=-1), packed(x))
        assert torch.equal(torch.cat([p(x) for p in parts], dim=-1), fused(x))


def test_explicit_part_that_cannot_apply_is_refused_default_one_is_skipped():
    gpt2 = tiny_config("gpt2")
    plan = resolve_recipe_parts(gpt2, DEFAULTS)
    assert plan.applied == ("attention", "hidden") and set(plan.skipped) == {"subln"}
    assert plan.line().count("\n") == 0 and "SubLN (--subln)" in plan.line()
    with pytest.raises(UserError, match=r"^--subln asks for SubLN, which does not apply to 'gpt2'"):
        resolve_recipe_parts(gpt2, {**DEFAULTS, "subln": True})
    assert resolve_recipe_parts(tiny_config("llama"), DEFAULTS).skipped == {}


def test_an_architecture_outside_the_table_works_by_discovery(tmp_path):
    """A decoder family bitdistill does not name (here SmolLM3) with the common block layout gets SubLN and the
    attention relation, and nothing the table would have to vouch for (fast decode, GGUF, BitNetForCausalLM)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("smollm3", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert cfg.model_type not in SUPPORTED_ARCHITECTURES
    spec = lookup(cfg)
    assert spec.discovered and spec.subln is None and spec.attention is None
    assert not spec.fast_decode and spec.gguf is None and spec.bitnet is not None
    student, plan = _student(cfg)
    assert plan.applied == ("subln", "attention", "hidden")
    targets = export_targets(cfg, subln=True)
    assert targets.packed == "extension" and targets.transformers and targets.llama_cpp
    student.save_pretrained(tmp_path / "student")
    pack_pretrained(tmp_path / "student", tmp_path / "packed", dtype="float32")
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "packed")(IDS).logits, student(IDS).logits)


def test_an_architecture_without_the_layout_is_refused_by_name():
    from torch import nn

    class Odd(nn.Module):
        config = type("C", (), {"model_type": "odd", "num_hidden_layers": 2})()

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    assert lookup(Odd()) is None
    plan = resolve_recipe_parts(Odd(), DEFAULTS)
    assert set(plan.skipped) == {"subln", "attention"} and plan.applied == ("hidden",)
    with pytest.raises(UserError, match=re.escape("--attention_weight asks for the attention-relation loss")):
        resolve_recipe_parts(Odd(), {"attention": True})


def test_folders_written_before_the_table_still_load(tmp_path):
    """Pinned: a student whose marker has no recipe record, a packed folder in the plain bitnet format and a run
    configuration without ``recipe_defaults`` (written before the recipe planner) still load and resume."""
    from bitdistill.export.writer import save_packed
    from bitdistill.runs import config_changes

    student = tiny_model("llama")
    replace_linear_with_bitlinear(student)
    student.save_pretrained(tmp_path / "student")
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert set(config["bitdistill"]) == {"format", "version", "use_rms_norm", "rms_norm_eps", "modules_to_not_convert"}
    loaded = load_student(tmp_path / "student")
    save_packed(loaded, tmp_path / "packed")
    qc = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
                  "modules_to_not_convert": ["lm_head"]}
    with torch.no_grad():
        torch.testing.assert_close(load_packed(tmp_path / "packed", dtype="float32")(IDS).logits,
                                   student(IDS).logits, rtol=0, atol=1e-5)
    assert config_changes({"subln": True}, {"subln": True, "recipe_defaults": ["subln"]}) == ""
