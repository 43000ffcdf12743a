"""Triton quantizers vs the reference: exact codes and scales (interpreted on CPU, native on CUDA)."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import DEVICE, DTYPES, assert_close, nan_like, rows_with_ties

from bitdistill.kernels import quant
from bitdistill.quant import reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (3, 130), (17, 72), (2, 3, 130)])
def test_activation_quant_matches_reference(dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype).to(DEVICE)
    out = (nan_like(shape, torch.int8), nan_like((*shape[:-1], 1), torch.float32))
    codes, scale = quant.activation_quant(x, out=out)
    ref_codes, ref_scale = reference.activation_quant(x.cpu())
    assert codes.data_ptr() == out[0].data_ptr()
    assert torch.equal(codes.cpu(), ref_codes)
    assert torch.equal(scale.cpu(), ref_scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_quant_round_half_to_even(dtype):
    x = rows_with_ties(3, 72, dtype)
    ref_codes, ref_scale = reference.activation_quant(x)
    products = x.float() * ref_scale
    ties = products == products.floor() + 0.5
    assert ties.sum() > 20, "the test input must contain exact ties"
    assert (ties & (products.floor() % 2 == 0)).any() and (ties & (products.floor() % 2 == 1)).any()
    codes, scale = quant.activation_quant(x.to(DEVICE))
    assert torch.equal(codes.cpu(), ref_codes)
    assert torch.equal(scale.cpu(), ref_scale)


def test_activation_quant_multi_chunk_rows(monkeypatch):
    monkeypatch.setattr(quant, "MAX_SINGLE_PASS_K", 32)
    x = torch.randn(3, 130, device=DEVICE)
    x[1, 100] = 40.0  # absmax in a late chunk
    codes, scale = quant.activation_quant(x)
    ref_codes, ref_scale = reference.activation_quant(x.cpu())
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scale.cpu(), ref_scale)


def test_activation_quant_zero_rows_and_empty_batch():
    x = torch.zeros(2, 8, device=DEVICE)
    codes, scale = quant.activation_quant(x)
    ref_codes, ref_scale = reference.activation_quant(x.cpu())
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scale.cpu(), ref_scale)
    codes, scale = quant.activation_quant(torch.empty(0, 8, device=DEVICE))
    assert codes.shape == (0, 8) and scale.shape == (0, 1)


def test_activation_quant_non_contiguous_and_misaligned():
    base = torch.randn(5, 140, device=DEVICE)
    for x in (base[:, 3:133], base.t().contiguous().t()[:, :130], base.flatten()[1:1 + 3 * 130].view(3, 130)):
        codes, scale = quant.activation_quant(x)
        ref_codes, ref_scale = reference.activation_quant(x.cpu())
        assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scale.cpu(), ref_scale)


def test_activation_quant_rejects_bad_input():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        quant.activation_quant(torch.ones(2, 8, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="out buffer"):
        quant.activation_quant(torch.ones(2, 8, device=DEVICE), out=(torch.empty(2, 8), torch.empty(2)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 8), (36, 130), (68, 72)])
def test_weight_quant_matches_reference(dtype, shape):
    w = torch.randn(shape).to(dtype).to(DEVICE)
    out = (nan_like(shape, torch.int8), nan_like((), torch.float32))
    codes, gamma = quant.weight_quant(w, out=out)
    _, ref_gamma = reference.weight_quant(w.cpu())
    # gamma is summed in another order than torch.mean: equal up to float32 rounding of the sum
    torch.testing.assert_close(gamma.cpu(), ref_gamma, rtol=1e-6, atol=0)
    # codes are exactly the reference's formula for this gamma
    expected = torch.round(w.cpu().float() / gamma.cpu()).clamp(-1, 1).to(torch.int8)
    assert torch.equal(codes.cpu(), expected)


def test_weight_quant_ties_and_exact_gamma():
    # mean |W| is exactly 1 in any summation order; +-0.5 and +-2.5 are ties (-> 0 and -> +-1 after clamp)
    vals = torch.tensor([0.5, -0.5, 1.5, -1.5, 1.0, 0.0, 2.5, -2.5, 0.0, 0.0])
    w = vals.repeat(8, 9)
    assert w.abs().mean().item() == 1.0
    for dtype in DTYPES:
        wd = w.to(dtype)
        codes, gamma = quant.weight_quant(wd.to(DEVICE))
        ref_codes, ref_gamma = reference.weight_quant(wd)
        assert gamma.item() == ref_gamma.item() == 1.0
        assert torch.equal(codes.cpu(), ref_codes)
        assert (ref_codes[wd == 0.5] == 0).all() and (ref_codes[wd == 2.5] == 1).all()


def test_weight_quant_gamma_floor_and_non_contiguous():
    codes, gamma = quant.weight_quant(torch.zeros(4, 8, device=DEVICE))
    assert gamma.item() == pytest.approx(1e-5) and (codes == 0).all()
    w = torch.randn(72, 36, device=DEVICE).t()  # a Conv1D-style transposed view
    codes, gamma = quant.weight_quant(w)
    expected = torch.round(w.cpu() / gamma.cpu()).clamp(-1, 1).to(torch.int8)
    assert torch.equal(codes.cpu(), expected)


@pytest.mark.gpu
def test_weight_quant_large_on_gpu_is_deterministic():
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    c1, g1 = quant.weight_quant(w)
    c2, g2 = quant.weight_quant(w)
    assert torch.equal(c1, c2) and torch.equal(g1, g2)
    _, ref_gamma = reference.weight_quant(w)
    torch.testing.assert_close(g1, ref_gamma, rtol=1e-5, atol=0)
    assert torch.equal(c1, torch.round(w.float() / g1).clamp(-1, 1).to(torch.int8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ternarize_and_dequant_ternary_match_reference(dtype):
    from bitdistill.kernels.quant import dequant_ternary, ternarize

    w = torch.randn(37, 29, device=DEVICE).to(dtype)
    codes, gamma = reference.weight_quant(w)
    out = nan_like(codes.shape, torch.int8)
    assert torch.equal(ternarize(w, gamma, out=out), codes) and torch.equal(out, codes)
    assert_close(dequant_ternary(w, gamma, dtype), (codes.float() * gamma).to(dtype), dtype)
