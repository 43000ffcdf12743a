"""Unit tests of the distillation building blocks: layer maps, Q/K/V capture, SubLN, warm-up, teacher cache."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bitdistill import load_student, replace_linear_with_bitlinear
from bitdistill.distill.attention import QKVCapture
from bitdistill.distill.layer_map import build_layer_map
from bitdistill.distill.losses import logits_distillation_loss
from bitdistill.distill.teacher_cache import (
    TeacherCache,
    cache_teacher_logits,
    cached_logits_loss,
    collapse_to_topk,
)
from bitdistill.distill.warmup import QuantWarmup
from bitdistill.models import tiny_model
from bitdistill.nn.subln import insert_subln


def test_layer_maps():
    assert build_layer_map("last", 2, 4) == [(2, (4,))]
    assert build_layer_map("all", 2, 2) == [(0, (0,)), (1, (1,)), (2, (2,))]
    assert build_layer_map("uniform", 2, 4) == [(0, (0,)), (1, (2,))]
    assert build_layer_map("uniform+last", 2, 4) == [(0, (0,)), (1, (2,)), (2, (4,))]
    assert build_layer_map("uniform-consecutive", 2, 4) == [(1, (1, 2)), (2, (3, 4))]
    assert build_layer_map("1:2,2:3+4", 2, 4) == [(1, (2,)), (2, (3, 4))]


@pytest.mark.parametrize(("spec", "match"), [("all", "equal depths"), ("uniform-consecutive", "multiple"),
                                             ("1:9", "teacher hidden state 9"), ("5:1", "student hidden state 5"),
                                             ("1-2", "cannot parse"), ("a:b", "integers")])
def test_layer_map_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        build_layer_map(spec, 2, 3)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt_neox", "gpt2"])
def test_qkv_capture_shapes_gqa_before_repetition(arch):
    model = tiny_model(arch)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    with QKVCapture(model, [-1]) as cap:
        model(input_ids=torch.randint(0, 256, (2, 5)))
    q, k, v = cap.states
    assert q.shape == (2, 5, cfg.num_attention_heads * head_dim)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    assert k.shape == v.shape == (2, 5, kv_heads * head_dim)


def test_qkv_capture_splits_gpt_neox_per_head_fused_output():
    """GPT-NeoX's query_key_value output is [heads, 3, head_dim] per token: the capture reads the same q/k/v as the
    model's attention (the rotary input)."""
    model = tiny_model("gpt_neox")
    attn = model.gpt_neox.layers[0].attention
    seen = {}
    handle = attn.query_key_value.register_forward_hook(lambda m, a, out: seen.setdefault("qkv", out))
    with QKVCapture(model, [0]) as cap:
        model(input_ids=torch.randint(0, 256, (1, 4)))
    handle.remove()
    q, k, v = cap.states
    heads = seen["qkv"].view(1, 4, model.config.num_attention_heads, -1).chunk(3, dim=-1)
    for got, want in zip((q, k, v), heads, strict=True):
        assert torch.equal(got, want.flatten(-2))


def test_unsupported_part_errors_name_the_reason():
    model = tiny_model("gpt2")
    replace_linear_with_bitlinear(model)
    with pytest.raises(ValueError, match="SubLN insertion does not apply to 'gpt2': SubLN is defined for RMSNorm"):
        insert_subln(model, init="ones")


def test_qkv_capture_bad_layer():
    with pytest.raises(ValueError, match="does not exist"):
        QKVCapture(tiny_model("llama"), [5])


def test_subln_calibrated_init_preserves_mean_scale_and_survives_save_load(tmp_path):
    model = tiny_model("llama")
    replace_linear_with_bitlinear(model)
    ids = torch.randint(0, 256, (2, 16))
    inputs = {}
    o_proj = model.model.layers[0].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0].detach()))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    handle.remove()
    names = insert_subln(model, init="calibrated", calibration_input_ids=ids)
    assert names == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                     "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    x = inputs["x"]
    rms = x.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(o_proj.rms_norm.weight, torch.full_like(o_proj.rms_norm.weight, rms.mean().item()))
    normed = o_proj.rms_norm(x)
    assert normed.pow(2).mean(-1).sqrt().mean().item() == pytest.approx(rms.mean().item(), rel=1e-3)
    assert model.model.layers[0].self_attn.q_proj.rms_norm is None
    with torch.no_grad():
        after = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = load_student(tmp_path)
    assert loaded.model.layers[1].mlp.down_proj.rms_norm is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, after)
    assert not torch.equal(before, after)


def test_quant_warmup_blends_from_full_precision_to_ternary():
    fp = tiny_model("llama")
    student = copy.deepcopy(fp)
    replace_linear_with_bitlinear(student)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        ternary = student(input_ids=ids).logits
        ref_fp = fp(input_ids=ids).logits
    warm = QuantWarmup(student, steps=4)
    student.train()
    warm.set_step(0)
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, ref_fp, rtol=1e-4, atol=1e-5)
        warm.set_step(4)
        torch.testing.assert_close(student(input_ids=ids).logits, ternary)
        warm.set_step(0)
        student.eval()
        torch.testing.assert_close(student(input_ids=ids).logits, ternary)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"])
def test_teacher_cache_with_full_vocab_reproduces_online_loss(tmp_path, kind):
    teacher = tiny_model("llama", seed=1)
    blocks = torch.randint(0, 256, (5, 12))
    cache_teacher_logits(teacher, blocks, tmp_path / "c", top_k=256, temperature=2.0, batch_size=2, blocks_per_shard=2)
    cache = TeacherCache(tmp_path / "c")
    cache.check_compatible(blocks, 256, 2.0)
    idx = torch.tensor([4, 0, 3])
    student_logits = torch.randn(3, 11, 256, requires_grad=True)
    with torch.no_grad():
        t_logits = teacher(input_ids=blocks[idx]).logits[:, :-1]
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 5:] = False
    online = logits_distillation_loss(student_logits, t_logits, mask, 28, kind=kind, temperature=2.0)
    ids, lp, tail = cache.lookup(idx)
    cached = cached_logits_loss(student_logits, ids, lp, tail, mask, 28, kind=kind, temperature=2.0)
    torch.testing.assert_close(cached, online, rtol=1e-4, atol=1e-6)
    g1, = torch.autograd.grad(online, student_logits)
    g2, = torch.autograd.grad(cached, student_logits)
    torch.testing.assert_close(g2, g1, rtol=1e-3, atol=1e-7)


def test_teacher_cache_top_k_is_a_lower_bound_and_checks_compatibility(tmp_path):
    teacher = tiny_model("llama", seed=1)
    blocks = torch.randint(0, 256, (3, 10))
    cache_teacher_logits(teacher, blocks, tmp_path / "c", top_k=8)
    cache = TeacherCache(tmp_path / "c")
    ids, lp, tail = cache.lookup(torch.arange(3))
    assert ids.shape == (3, 9, 8) and tail.shape == (3, 9)
    torch.testing.assert_close(torch.logsumexp(torch.cat([lp, tail[..., None]], -1), -1), torch.zeros(3, 9),
                               atol=1e-5, rtol=0)
    s = torch.randn(3, 9, 256)
    mask = torch.ones(3, 9, dtype=torch.bool)
    with torch.no_grad():
        t = teacher(input_ids=blocks).logits[:, :-1]
    full = logits_distillation_loss(s, t, mask, 27)
    assert cached_logits_loss(s, ids, lp, tail, mask, 27).item() <= full.item() + 1e-6
    with pytest.raises(ValueError, match="different training data"):
        cache.check_compatible(blocks[:2], 256, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        cache.check_compatible(blocks, 256, 2.0)
    with pytest.raises(ValueError, match="needs the full teacher logits"):
        cached_logits_loss(s, ids, lp, tail, mask, 27, kind="mse")
    with pytest.raises(FileExistsError):
        cache_teacher_logits(teacher, blocks, tmp_path / "c", top_k=8)
    with pytest.raises(FileNotFoundError, match="cache-teacher"):
        TeacherCache(tmp_path)


def test_collapse_to_topk_full_vocab_has_empty_tail():
    teacher = torch.randn(2, 4, 16)
    ids, lp, tail = collapse_to_topk(teacher, 16, 1.0)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 4))
    assert torch.isinf(tail).all()
    torch.testing.assert_close(lp, F.log_softmax(teacher, -1).gather(-1, ids))


def test_distillation_names_are_public_and_lazy():
    import subprocess
    import sys

    code = ("import sys, bitdistill; assert 'transformers.trainer' not in sys.modules; "
            "from bitdistill import DistillationTrainer, load_for_eval; print(DistillationTrainer.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "DistillationTrainer"


def test_subln_marker_survives_save_and_load(tmp_path):
    from bitdistill import load_student, replace_linear_with_bitlinear
    from bitdistill.models import tiny_model
    from bitdistill.nn import student_marker
    from bitdistill.nn.subln import insert_subln

    model = tiny_model("llama")
    replace_linear_with_bitlinear(model)
    names = insert_subln(model, init="ones")
    model.save_pretrained(tmp_path)
    loaded = load_student(tmp_path)
    assert student_marker(loaded)["subln_modules"] == student_marker(model)["subln_modules"] == names
    replace_linear_with_bitlinear(loaded)  # converting again (a no-op) keeps what SubLN recorded
    assert student_marker(loaded)["subln_modules"] == names


def test_load_student_reports_only_tensors_it_does_not_load_itself(tmp_path):
    """transformers reports a SubLN student's norm weights as unexpected (load_student loads them after converting
    the model): that warning is dropped, while a tensor foreign to the model is still reported."""
    import logging

    from safetensors.torch import load_file, save_file

    from bitdistill import load_student, replace_linear_with_bitlinear
    from bitdistill.models import tiny_model
    from bitdistill.nn.subln import insert_subln

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    model = tiny_model("llama")
    replace_linear_with_bitlinear(model)
    insert_subln(model, init="ones")
    model.save_pretrained(tmp_path)
    from transformers.utils import logging as hf_logging

    seen, keep = [], Keep()
    logging.getLogger("transformers").addHandler(keep)  # transformers' root logger does not propagate
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # the CLIs a test ran in this process may have left it at errors only
    try:
        load_student(tmp_path)
        assert not any("rms_norm" in m for m in seen), seen
        weights = next(tmp_path.glob("*.safetensors"))
        tensors = load_file(weights)
        tensors["model.foreign.weight"] = torch.ones(3)
        save_file(tensors, weights, metadata={"format": "pt"})
        load_student(tmp_path)
        assert any("model.foreign.weight" in m for m in seen), seen
    finally:
        logging.getLogger("transformers").removeHandler(keep)
        hf_logging.set_verbosity(verbosity)
