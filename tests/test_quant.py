"""Exact tests of the reference quantizers (bitdistill.quant.reference)."""

from __future__ import annotations

import pytest
import torch

from bitdistill.quant import (
    activation_quant,
    bitlinear_reference,
    fake_quant_activation,
    fake_quant_weight,
    int_matmul,
    weight_quant,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_weight_quant_codes_and_gamma_match_definition():
    w = torch.randn(37, 53)
    codes, gamma = weight_quant(w)
    expected_gamma = w.abs().mean()
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert gamma.dtype == torch.float32 and gamma.dim() == 0
    assert torch.equal(gamma, expected_gamma)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    # |W| > 1.5 gamma -> +-1, |W| < 0.5 gamma -> 0 (away from ties)
    assert torch.equal(codes[w > 1.5 * gamma], torch.ones_like(codes[w > 1.5 * gamma]))
    assert torch.equal(codes[w < -1.5 * gamma], -torch.ones_like(codes[w < -1.5 * gamma]))
    assert (codes[w.abs() < 0.49 * gamma] == 0).all()


def test_weight_quant_ties_round_half_to_even():
    # mean(|w|) = 1 exactly, so w / gamma = w: 0.5 -> 0 and -0.5 -> 0 (half to even; half-up would give 1),
    # 1.5 -> 2 -> clamp 1, -1.5 -> -2 -> clamp -1.
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5]])
    codes, gamma = weight_quant(w)
    assert gamma.item() == 1.0
    assert codes.tolist() == [[0, 0, 1, -1]]


def test_activation_quant_ties_round_half_to_even():
    # absmax 127 -> s_x = 1 exactly: x * s_x keeps the .5 ties, which must go to the even integer.
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.0, -127.0]])
    codes, scale = activation_quant(x)
    assert torch.equal(scale, torch.ones(1, 1))
    assert codes.tolist() == [[0, 2, 2, 0, -2, -2, 126, 127, -127]]


def test_activation_quant_per_token_scale_and_clamp():
    x = torch.randn(4, 7, 33) * torch.logspace(-3, 3, 7).view(1, 7, 1)
    codes, scale = activation_quant(x)
    assert codes.shape == x.shape and scale.shape == (4, 7, 1)
    assert torch.allclose(scale, 127 / x.abs().amax(-1, keepdim=True))
    assert codes.abs().amax(-1).eq(127).all()  # the absmax element of every token maps to +-127
    assert codes.min() >= -128 and codes.max() <= 127


@pytest.mark.parametrize("dtype", DTYPES)
def test_math_is_float32_whatever_the_input_dtype(dtype):
    x = torch.randn(5, 40).to(dtype)
    w = torch.randn(12, 40).to(dtype)
    xc, xs = activation_quant(x)
    xc32, xs32 = activation_quant(x.float())
    assert torch.equal(xc, xc32) and torch.equal(xs, xs32) and xs.dtype == torch.float32
    wc, g = weight_quant(w)
    wc32, g32 = weight_quant(w.float())
    assert torch.equal(wc, wc32) and torch.equal(g, g32)
    assert fake_quant_activation(x).dtype == dtype and fake_quant_weight(w).dtype == dtype


def test_all_zero_weight_and_token_stay_finite():
    w = torch.zeros(8, 16)
    codes, gamma = weight_quant(w)
    assert (codes == 0).all() and gamma.item() == pytest.approx(1e-5)
    x = torch.zeros(3, 16)
    x[1] = torch.randn(16)
    xc, xs = activation_quant(x)
    assert torch.isfinite(xs).all() and (xc[0] == 0).all() and (xc[2] == 0).all()
    bias = torch.randn(8)
    y = bitlinear_reference(x, torch.randn(8, 16), bias)
    assert torch.isfinite(y).all()
    assert torch.equal(y[0], bias) and torch.equal(y[2], bias)


@pytest.mark.parametrize("magnitude", [1e-30, 1e-8, 1e-3, 1e8, 1e30])
def test_extreme_magnitudes(magnitude):
    x = torch.randn(4, 32) * magnitude
    w = torch.randn(8, 32) * magnitude
    xc, xs = activation_quant(x)
    _wc, g = weight_quant(w)
    assert torch.isfinite(xs).all() and torch.isfinite(g)
    # the true product of two 1e30-scale operands overflows float32 whatever the layer; scale one at a time
    assert torch.isfinite(bitlinear_reference(x, torch.randn(8, 32))).all()
    assert torch.isfinite(bitlinear_reference(torch.randn(4, 32), w)).all()
    if magnitude >= 1e-3:  # with absmax above the 1e-5 floor the codes are scale-invariant
        xc1, _ = activation_quant(x / magnitude)
        assert (xc != xc1).float().mean() < 0.02  # only float rounding at ties may move a code


def test_fp16_extremes():
    x = torch.tensor([[65504.0, -65504.0, 1.0, 0.0]], dtype=torch.float16)
    codes, _scale = activation_quant(x)
    assert codes.tolist() == [[127, -127, 0, 0]]
    assert torch.isfinite(fake_quant_activation(x)).all()


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 3, 7), (2, 3, 4, 9), (1, 1, 1, 130)])
def test_nd_and_noncontiguous_inputs(shape):
    x = torch.randn(*shape[:-1], shape[-1] * 2)[..., ::2]  # non-contiguous last dim
    assert not x.is_contiguous() or x.shape[-1] == 1
    codes, scale = activation_quant(x)
    codes_c, scale_c = activation_quant(x.contiguous())
    assert torch.equal(codes, codes_c) and torch.equal(scale, scale_c)
    w = torch.randn(shape[-1] * 2, 6).t()  # non-contiguous weight [6, K]
    assert torch.equal(weight_quant(w)[0], weight_quant(w.contiguous())[0])


def test_fake_quant_is_dequantized_codes():
    x = torch.randn(6, 20)
    codes, scale = activation_quant(x)
    assert torch.equal(fake_quant_activation(x), codes.float() / scale)
    w = torch.randn(9, 20)
    wc, g = weight_quant(w)
    assert torch.equal(fake_quant_weight(w), wc.float() * g)
    assert fake_quant_weight(w).unique().numel() <= 3


def test_int_matmul_is_exact():
    xc = torch.randint(-128, 128, (5, 300), dtype=torch.int8)
    wc = torch.randint(-1, 2, (7, 300), dtype=torch.int8)
    exact = xc.long() @ wc.long().t()
    assert torch.equal(int_matmul(xc, wc).long(), exact)


def test_bitlinear_reference_equals_fake_quant_linear():
    x = torch.randn(2, 5, 48, dtype=torch.float64).float()
    w, b = torch.randn(24, 48), torch.randn(24)
    y = bitlinear_reference(x, w, b)
    xc, xs = activation_quant(x)
    wc, g = weight_quant(w)
    expected = (xc.double() @ wc.double().t()) * g.double() / xs.double() + b.double()
    assert y.shape == (2, 5, 24)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)


def test_inputs_are_not_mutated():
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    x0, w0 = x.clone(), w.clone()
    activation_quant(x), weight_quant(w), bitlinear_reference(x, w), fake_quant_weight(w), fake_quant_activation(x)
    assert torch.equal(x, x0) and torch.equal(w, w0)
