"""Property tests of the distillation losses (pure functions)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from bitdistill.distill.args import LossArguments
from bitdistill.distill.losses import (
    LOGIT_LOSSES,
    LOSS_TERMS,
    attention_relation_loss,
    cross_entropy_loss,
    divergence,
    hidden_state_loss,
    logits_distillation_loss,
    prediction_mask,
)

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")


def test_loss_terms_are_the_weighted_loss_arguments():
    """Each term the trainer weighs (and logs as ``loss_<term>``) has a ``--<term>_weight``, and no weight lacks a term."""
    weights = {f.name.removesuffix("_weight") for f in dataclasses.fields(LossArguments) if f.name.endswith("_weight")}
    assert weights == set(LOSS_TERMS) and len(LOSS_TERMS) == 4


def _logits(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3


@pytest.mark.parametrize("kind", LOGIT_LOSSES)
def test_zero_for_identical_inputs(kind):
    z = _logits(2, 5, 11)
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss = logits_distillation_loss(z, z.clone(), mask, 10, kind=kind, temperature=2.0)
    assert loss.abs().item() < 1e-6


@pytest.mark.parametrize("kind", LOGIT_LOSSES)
def test_positive_for_different_inputs(kind):
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert logits_distillation_loss(_logits(2, 5, 11), _logits(2, 5, 11, seed=1), mask, 10, kind=kind).item() > 1e-3


def test_known_values_on_two_bins():
    p = torch.tensor([0.75, 0.25])
    q = torch.tensor([0.5, 0.5])
    lp, lq = p.log(), q.log()
    fkl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    m = [0.625, 0.375]
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + \
        0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    mix = [0.1 * 0.75 + 0.9 * 0.5, 0.1 * 0.25 + 0.9 * 0.5]
    skew = 0.75 * math.log(0.75 / mix[0]) + 0.25 * math.log(0.25 / mix[1])
    assert divergence(lq, lp, "forward_kl").item() == pytest.approx(fkl, rel=1e-5)
    assert divergence(lq, lp, "reverse_kl").item() == pytest.approx(rkl, rel=1e-5)
    assert divergence(lq, lp, "jsd", beta=0.5).item() == pytest.approx(jsd, rel=1e-5)
    assert divergence(lq, lp, "skew_kl", alpha=0.1).item() == pytest.approx(skew, rel=1e-5)
    assert divergence(lq, lp, "tvd").item() == pytest.approx(0.25, rel=1e-5)


def test_known_values_mse_cosine():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    mask = torch.ones(1, dtype=torch.bool)
    assert logits_distillation_loss(s, t, mask, 1, kind="mse").item() == pytest.approx(1.0)
    assert logits_distillation_loss(s, t, mask, 1, kind="cosine").item() == pytest.approx(1.0)


def test_forward_kl_matches_torch_kl_div():
    s, t = _logits(3, 4, 9), _logits(3, 4, 9, seed=2)
    mask = torch.ones(3, 4, dtype=torch.bool)
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / 12
    assert logits_distillation_loss(s, t, mask, 12).item() == pytest.approx(ref.item(), rel=1e-5)


def test_jsd_symmetric_at_half_and_not_elsewhere():
    a, b = F.log_softmax(_logits(4, 7), -1), F.log_softmax(_logits(4, 7, seed=3), -1)
    torch.testing.assert_close(divergence(a, b, "jsd", beta=0.5), divergence(b, a, "jsd", beta=0.5))
    assert not torch.allclose(divergence(a, b, "jsd", beta=0.2), divergence(b, a, "jsd", beta=0.2))
    torch.testing.assert_close(divergence(a, b, "jsd", beta=0.2), divergence(b, a, "jsd", beta=0.8))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_temperature_scaling(kind):
    s, t = _logits(2, 3, 13), _logits(2, 3, 13, seed=4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    tau = 2.5
    scaled = logits_distillation_loss(s, t, mask, 6, kind=kind, temperature=tau)
    plain = logits_distillation_loss(s / tau, t / tau, mask, 6, kind=kind, temperature=1.0)
    assert scaled.item() == pytest.approx(tau**2 * plain.item(), rel=1e-5)


@pytest.mark.parametrize("kind", LOGIT_LOSSES)
def test_masked_positions_contribute_nothing_even_if_nan(kind):
    s, t = _logits(2, 6, 8), _logits(2, 6, 8, seed=5)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    s_bad = s.clone()
    s_bad[1, 3:] = float("nan")
    full = logits_distillation_loss(s_bad, t, mask, 9, kind=kind)
    only_valid = logits_distillation_loss(s[mask], t[mask], torch.ones(9, dtype=torch.bool), 9, kind=kind)
    assert torch.isfinite(full)
    assert full.item() == pytest.approx(only_valid.item(), rel=1e-5)


def test_prediction_mask_shifts_and_masks_padding_and_ignored_labels():
    labels = torch.tensor([[5, 6, -100, 7], [1, 2, 3, 4]])
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    mask = prediction_mask(labels, attn)
    assert mask.tolist() == [[True, False, True], [True, False, False]]


def test_normalization_over_the_accumulation_window():
    s, t = _logits(4, 5, 7), _logits(4, 5, 7, seed=6)
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(0)) > 0.3
    n = mask.sum()
    whole = logits_distillation_loss(s, t, mask, n)
    parts = sum(logits_distillation_loss(s[i:i + 1], t[i:i + 1], mask[i:i + 1], n) for i in range(4))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-5)
    per_token = divergence(F.log_softmax(s, -1), F.log_softmax(t, -1))[mask].mean()
    assert whole.item() == pytest.approx(per_token.item(), rel=1e-5)


def test_cross_entropy_matches_mean_token_nll():
    logits = _logits(2, 6, 10)
    labels = torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(1))
    labels[0, 4] = -100
    n = prediction_mask(labels).sum()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert cross_entropy_loss(logits, labels, n).item() == pytest.approx(ref.item(), rel=1e-5)


def test_hidden_state_loss_zero_known_value_and_one_to_n():
    h = [torch.randn(2, 3, 4) for _ in range(3)]
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert hidden_state_loss(h, [x.clone() for x in h], [(0, (0,)), (2, (2,))], mask, 6).item() == 0.0
    t = [x + 1.0 for x in h]
    assert hidden_state_loss(h, t, [(1, (1,))], mask, 6).item() == pytest.approx(1.0)
    t2 = [h[0], h[1] + 1.0, h[1] + 3.0]
    assert hidden_state_loss(h, t2, [(1, (1, 2))], mask, 6).item() == pytest.approx((1.0 + 9.0) / 2)
    proj = torch.nn.ModuleList([torch.nn.Linear(4, 5, bias=False)])
    wide = [torch.randn(2, 3, 5) for _ in range(3)]
    assert torch.isfinite(hidden_state_loss(h, wide, [(2, (2,))], mask, 6, projectors=proj))
    with pytest.raises(ValueError, match="projector"):
        hidden_state_loss(h, wide, [(2, (2,))], mask, 6)


def test_attention_relation_loss_zero_invariant_and_positive():
    s = [torch.randn(2, 5, 8) for _ in range(3)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert attention_relation_loss(s, [x.clone() for x in s], mask, 10, num_relation_heads=2).abs().item() < 1e-6
    wider = [torch.cat([x, torch.zeros(2, 5, 8)], -1) for x in s]
    # zero-padding each relation head to twice the width, rescaled by 2**0.25 for the 1/sqrt(d) factor, keeps
    # the relations: widths may differ between student and teacher
    c = 2**0.25
    heads = [torch.cat([c * x[..., :4], torch.zeros(2, 5, 4), c * x[..., 4:], torch.zeros(2, 5, 4)], -1) for x in s]
    assert attention_relation_loss(s, heads, mask, 10, num_relation_heads=2).abs().item() < 1e-5
    assert attention_relation_loss(s, wider, mask, 10, num_relation_heads=2).item() > 1e-4
    with pytest.raises(ValueError, match="relation heads"):
        attention_relation_loss(s, s, mask, 10, num_relation_heads=3)


def test_attention_relation_loss_ignores_padded_keys():
    s = [torch.randn(1, 4, 6)]
    t = [torch.randn(1, 4, 6)]
    key_mask = torch.tensor([[1, 1, 1, 0]])
    mask = key_mask.bool()
    s2 = [s[0].clone()]
    t2 = [t[0].clone()]
    s2[0][0, 3] = 100.0
    t2[0][0, 3] = -50.0
    a = attention_relation_loss(s, t, mask, 3, num_relation_heads=1, key_mask=key_mask)
    b = attention_relation_loss(s2, t2, mask, 3, num_relation_heads=1, key_mask=key_mask)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_bad_arguments():
    z = _logits(1, 2, 3)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown logit loss"):
        logits_distillation_loss(z, z, mask, 1, kind="kl")
    with pytest.raises(ValueError, match="vocabulary"):
        logits_distillation_loss(z, _logits(1, 2, 4), mask, 1)
    with pytest.raises(ValueError, match="beta"):
        logits_distillation_loss(z, z, mask, 1, kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="temperature"):
        logits_distillation_loss(z, z, mask, 1, temperature=0.0)
