"""replace_linear_with_bitlinear on tiny models of every supported family, and its options."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
from fake_quant import ste_fake_quant_linear
from torch import nn

from bitdistill import (
    BitConv1D,
    BitLinear,
    load_student,
    replace_linear_with_bitlinear,
)
from bitdistill.models import TINY_ARCHITECTURES, tiny_model
from bitdistill.nn import matches_module_pattern, student_marker


def _fq_forward(self, x):
    """Independent fake-quant forward (detach trick, STE) for an nn.Linear or Conv1D module."""
    conv1d_layout = isinstance(self, BitConv1D) or type(self).__name__ == "Conv1D"  # weight [in, out]
    w = self.weight.t() if conv1d_layout else self.weight
    return ste_fake_quant_linear(x, w, self.bias)


def fake_quant_copy(model, converted_names):
    ref = copy.deepcopy(model)
    for name in converted_names:
        module = ref.get_submodule(name)
        module.forward = types.MethodType(_fq_forward, module)
    return ref


@pytest.fixture(params=TINY_ARCHITECTURES)
def arch(request):
    return request.param


def test_convert_forward_backward_generate(arch):
    model = tiny_model(arch)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())  # GPT-NeoX: embed_out
    ref = fake_quant_copy(model, [n for n in names if n != head])
    report = replace_linear_with_bitlinear(model)
    assert sorted(report.converted) == sorted(n for n in names if n != head)
    assert head in report.skipped
    assert all(isinstance(model.get_submodule(n), BitLinear) for n in report.converted)
    assert not isinstance(model.get_output_embeddings(), BitLinear)
    if arch == "gpt2":
        assert all(isinstance(model.get_submodule(n), BitConv1D) for n in report.converted)

    # Every converted layer computes the independent fake-quant function of the input it receives.
    captured = []
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o: captured.append((m, i[0], o)))
             for n in report.converted]
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    out = model(ids, labels=ids)
    for h in hooks:
        h.remove()
    assert len(captured) == len(report.converted)
    for module, x, y in captured:
        torch.testing.assert_close(y, _fq_forward(module, x), rtol=1e-5, atol=1e-5)

    # Whole model: the same up to float rounding, which can move an activation code at a .5 boundary
    # in a later layer (one step of 1/s_x); compare the bulk tightly and the worst element loosely.
    out_ref = ref(ids, labels=ids)
    diff = (out.logits - out_ref.logits).abs()
    assert diff.max() < 1e-2 and (diff < 1e-4).float().mean() > 0.9
    out.loss.backward()
    out_ref.loss.backward()
    ref_params = dict(ref.named_parameters())
    for name in report.converted:
        grad = model.get_submodule(name).weight.grad
        ref_grad = ref_params[f"{name}.weight"].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        assert (grad - ref_grad).norm() <= 2e-2 * ref_grad.norm(), name

    generated = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)


def test_training_lowers_loss(arch):
    model = tiny_model(arch).train()
    replace_linear_with_bitlinear(model)
    ids = torch.randint(0, model.config.vocab_size, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_keeps_device_dtype_requires_grad_and_ties():
    model = tiny_model("qwen2", dtype=torch.bfloat16)  # tied embeddings
    q = model.model.layers[0].self_attn.q_proj
    q.weight.requires_grad_(False)
    weight_before = q.weight
    replace_linear_with_bitlinear(model, modules_to_not_convert=(), convert_output_head=True)
    new_q = model.model.layers[0].self_attn.q_proj
    assert isinstance(new_q, BitLinear) and new_q.weight is weight_before
    assert new_q.weight.dtype == torch.bfloat16 and not new_q.weight.requires_grad
    assert isinstance(model.lm_head, BitLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model(torch.randint(0, 256, (1, 5))).logits.dtype == torch.bfloat16


def test_state_dict_keys_unchanged_and_idempotent():
    model = tiny_model("llama")
    keys = list(model.state_dict())
    first = replace_linear_with_bitlinear(model)
    assert list(model.state_dict()) == keys
    second = replace_linear_with_bitlinear(model)
    assert second.converted == [] and sorted(second.already_converted) == sorted(first.converted)


@pytest.mark.parametrize("pattern, name, expected", [
    ("model.layers.1", "model.layers.1.mlp.up_proj", True),
    ("model.layers.1", "model.layers.11.mlp.up_proj", False),
    ("q_proj", "model.layers.0.self_attn.q_proj", True),
    (r"model\.layers\.\d+\.mlp", "model.layers.3.mlp.down_proj", True),
    ("mlp.gate", "model.layers.0.mlp.gate_proj", False),
    ("lm_head", "lm_head", True),
])
def test_skip_pattern_matching(pattern, name, expected):
    assert matches_module_pattern(name, pattern) is expected


def test_skip_patterns_filter_fn_and_report():
    model = tiny_model("llama")
    report = replace_linear_with_bitlinear(
        model, modules_to_not_convert=("lm_head", "model.layers.1", "q_proj"),
        filter_fn=lambda module, name: "down_proj" not in name)
    assert not any(n.startswith("model.layers.1.") for n in report.converted)
    assert not any(n.endswith(("q_proj", "down_proj")) for n in report.converted)
    assert report.skipped["model.layers.0.mlp.down_proj"] == "filter_fn returned False"
    assert "model.layers.1.mlp.up_proj" in report.skipped
    assert "converted" in str(report)
    marker = student_marker(model)
    assert marker["modules_to_not_convert"] == sorted(report.skipped)


def test_warnings_for_unmatched_pattern_and_nothing_converted():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="matched no linear module"):
        replace_linear_with_bitlinear(model, modules_to_not_convert=("lm_head", "no_such_module"))
    with pytest.warns(UserWarning, match="converted nothing"):
        replace_linear_with_bitlinear(nn.Sequential(nn.ReLU(), nn.Embedding(4, 4)))


def test_output_head_kept_whatever_its_name():
    model = tiny_model("gpt_neox")
    head = model.get_output_embeddings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = replace_linear_with_bitlinear(model, modules_to_not_convert=())
    assert model.get_output_embeddings() is head and not isinstance(head, BitLinear)
    assert any("output head" in reason for reason in report.skipped.values())


def test_nan_weight_is_a_clear_error():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*NaN"):
        replace_linear_with_bitlinear(model)


@pytest.mark.parametrize("use_rms_norm", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_and_load_student_round_trip(tmp_path, arch, use_rms_norm):
    model = tiny_model(arch)
    replace_linear_with_bitlinear(model, use_rms_norm=use_rms_norm)
    if use_rms_norm:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, BitLinear):
                    m.rms_norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    loaded = load_student(tmp_path)
    assert student_marker(loaded)["use_rms_norm"] is use_rms_norm
    ids = torch.randint(0, 256, (2, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert sorted(loaded.state_dict()) == sorted(model.state_dict())


def test_load_student_rejects_plain_model(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a bitdistill BitNet student"):
        load_student(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_student(tmp_path / "missing")
