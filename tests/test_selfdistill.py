"""Self-distillation: multi-exit wrapper, BYOT loss, stop-gradient, training, early exit, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitdistill import replace_linear_with_bitlinear
from bitdistill.eval.perplexity import strided_perplexities, strided_perplexity
from bitdistill.models import tiny_model
from bitdistill.selfdistill import (
    MultiExitLM,
    SelfDistillConfig,
    SelfDistillModel,
    early_exit_generate,
    early_exit_logits,
    early_exit_perplexity,
    self_distillation_loss,
)

ARCHS = ["llama", "qwen2", "gpt_neox", "gpt2"]
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["shared", "separate", "concat"])
@pytest.mark.parametrize("ternary", [False, True])
def test_exit_shapes_and_deepest_exit_is_the_model(arch, variant, ternary):
    model = tiny_model(arch)
    if ternary:
        replace_linear_with_bitlinear(model)
    mx = MultiExitLM(model, variant=variant)
    out = mx(IDS)
    expected = 2 if variant == "concat" else model.config.num_hidden_layers
    assert len(out.logits) == len(out.hidden) == len(out.exit_layers) == expected
    assert all(z.shape == (2, 12, 256) for z in out.logits)
    assert all(h.shape == (2, 12, 64) for h in out.hidden)
    torch.testing.assert_close(out.logits[-1], model(IDS).logits)


def test_separate_heads_start_equal_to_shared():
    model = tiny_model("llama", seed=3)
    shared, separate = MultiExitLM(model, variant="shared")(IDS), MultiExitLM(model, variant="separate")(IDS)
    for a, b in zip(shared.logits, separate.logits, strict=True):
        torch.testing.assert_close(a, b)


def test_without_self_distillation_terms_equals_plain_training():
    model = tiny_model("llama")
    sd = SelfDistillModel(MultiExitLM(model), SelfDistillConfig(alpha=0.0, hint_weight=0.0, exit_weights=[0.0]))
    loss, _, _ = sd(IDS)
    plain = tiny_model("llama")
    plain_loss = plain(IDS, labels=IDS).loss
    torch.testing.assert_close(loss, plain_loss)
    loss.backward()
    plain_loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_no_gradient_flows_into_the_teacher_signal():
    deep = torch.randn(2, 6, 32, requires_grad=True)
    shallow = torch.randn(2, 6, 32, requires_grad=True)
    h_deep = torch.randn(2, 6, 8, requires_grad=True)
    h_shallow = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.randint(0, 32, (2, 6))
    from bitdistill.selfdistill import Bottleneck

    cfg = SelfDistillConfig(alpha=1.0, hint_weight=1.0)
    loss, _ = self_distillation_loss([shallow, deep], [h_shallow, h_deep], labels, cfg, [Bottleneck(8)])
    loss.backward()
    deep_ce_only = deep.detach().clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(deep_ce_only[:, :-1].reshape(-1, 32), labels[:, 1:].reshape(-1))
    ce.backward()
    torch.testing.assert_close(deep.grad, deep_ce_only.grad)  # only the deepest exit's own CE reaches it
    assert h_deep.grad is None or torch.count_nonzero(h_deep.grad) == 0
    assert shallow.grad.abs().sum() > 0 and h_shallow.grad.abs().sum() > 0


def test_kl_term_is_zero_when_exits_agree_and_scales_with_tau_squared():
    z = torch.randn(1, 5, 16)
    labels = torch.randint(0, 16, (1, 5))
    _, parts = self_distillation_loss([z, z.clone()], [torch.zeros(1, 5, 4)] * 2, labels,
                                      SelfDistillConfig(hint_weight=0.0))
    assert parts["kl_0"].abs() < 1e-6
    z2 = torch.randn(1, 5, 16)
    loss_a, parts_a = self_distillation_loss([z2, z], [torch.zeros(1, 5, 4)] * 2, labels,
                                             SelfDistillConfig(alpha=1.0, temperature=1.0, hint_weight=0.0))
    expected = loss_a - parts_a["ce_1"]
    torch.testing.assert_close(expected, parts_a["kl_0"])


@pytest.mark.parametrize("variant", ["shared", "separate"])
def test_a_few_steps_lower_every_exits_loss(variant):
    model = tiny_model("gpt_neox").train()
    replace_linear_with_bitlinear(model)
    sd = SelfDistillModel(MultiExitLM(model, variant=variant), SelfDistillConfig(hint_weight=1e-3))
    opt = torch.optim.AdamW(sd.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    first = None
    for _ in range(15):
        loss, parts, _ = sd(ids)
        first = first or {k: v.item() for k, v in parts.items() if k.startswith("ce_")}
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, parts, _ = sd(ids)
    for name, before in first.items():
        assert parts[name].item() < before, (name, before, parts[name].item())


def test_early_exit_generate():
    model = tiny_model("llama")
    mx = MultiExitLM(model)
    prompt = IDS[:1, :5]
    full = early_exit_generate(mx, prompt, max_new_tokens=4, threshold=2.0)
    assert torch.equal(full.sequences, model.generate(prompt, max_new_tokens=4, do_sample=False))
    assert full.exit_blocks == [1] * 4 and full.mean_depth_fraction == 1.0
    eager = early_exit_generate(mx, prompt, max_new_tokens=4, threshold=0.0)
    assert eager.exit_blocks == [0] * 4 and eager.mean_depth_fraction == 0.5
    first_exit = mx(prompt).logits[0][:, -1].argmax(-1)
    assert eager.sequences[0, 5] == first_exit


def test_early_exit_logits_takes_the_first_confident_exit():
    sure = torch.tensor([[[9.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # position 0 confident, position 1 uniform
    unsure = torch.zeros(1, 2, 3)
    deep = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 5.0]]])
    chosen, index = early_exit_logits([unsure, sure, deep], threshold=0.9)
    assert index.tolist() == [[1, 2]]
    assert torch.equal(chosen[0, 0], sure[0, 0]) and torch.equal(chosen[0, 1], deep[0, 1])
    assert early_exit_logits([unsure, sure, deep], threshold=1.5)[1].tolist() == [[2, 2]]
    assert early_exit_logits([unsure, sure, deep], threshold=0.0)[1].tolist() == [[0, 0]]


def test_early_exit_perplexity_matches_decoding_and_its_limits():
    torch.manual_seed(0)
    model = tiny_model("gpt_neox", seed=3)
    mx = SelfDistillModel(MultiExitLM(model, variant="separate"), SelfDistillConfig(hint_weight=0)).multi_exit
    with torch.no_grad():
        for p in mx.exit_heads.parameters():
            p.mul_(8.0)  # sharper first exit: some tokens exit early at 0.2, some do not
    ids = torch.randint(0, 256, (40,))
    full, depth = early_exit_perplexity(mx, ids, threshold=2.0, max_length=20)
    assert depth == 1.0 and full.perplexity == pytest.approx(strided_perplexity(model, ids, max_length=20).perplexity)
    first, depth0 = early_exit_perplexity(mx, ids, threshold=0.0, max_length=20)
    assert depth0 == 0.5
    expected = strided_perplexities(lambda x: [mx(x).logits[0]], mx, ids, max_length=20)[0]
    assert first.perplexity == pytest.approx(expected.perplexity)
    _, mid = early_exit_perplexity(mx, ids, threshold=0.2, max_length=20)
    assert 0.5 < mid < 1.0
    # teacher-forced on the generated sequence, the chosen exits' argmax reproduce early-exit decoding
    gen = early_exit_generate(mx, ids[None, :6], max_new_tokens=8, threshold=0.2)
    chosen, index = early_exit_logits(mx(gen.sequences).logits, 0.2)
    assert torch.equal(chosen[0, 5:-1].argmax(-1), gen.sequences[0, 6:])
    assert [mx.output_layers[i] for i in index[0, 5:-1].tolist()] == gen.exit_blocks


def test_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        MultiExitLM(model, exit_layers=[5])
    with pytest.raises(ValueError, match="unknown exit variant"):
        MultiExitLM(model, variant="tree")
    with pytest.raises(ValueError, match="cannot find the decoder blocks"):
        MultiExitLM(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="feature hints need per-block exits"):
        SelfDistillModel(MultiExitLM(model, variant="concat"), SelfDistillConfig(hint_weight=1e-6))
    with pytest.raises(ValueError, match="alpha"):
        SelfDistillConfig(alpha=2.0)
    with pytest.raises(ValueError, match=r"\[1, T\]"):
        early_exit_generate(MultiExitLM(model), IDS, max_new_tokens=1, threshold=0.5)
