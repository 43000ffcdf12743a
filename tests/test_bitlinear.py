"""BitLinear forward, straight-through backward, saved tensors, options and bad input."""

from __future__ import annotations

import pytest
import torch
from fake_quant import ste_fake_quant_linear
from torch import nn

from bitdistill import BitLinear, bitlinear
from bitdistill.quant import activation_quant, weight_quant

# Tolerances per activation dtype for outputs/gradients vs an independent float64 computation.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (7, 24), (2, 3, 24)])
def test_forward_and_ste_backward_match_reference(dtype, bias, shape):
    layer = BitLinear(24, 20, bias=bias, dtype=dtype)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], 20)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = layer.weight.detach().clone().requires_grad_(True)
    b_ref = layer.bias.detach().clone().requires_grad_(True) if bias else None
    y_ref = ste_fake_quant_linear(x_ref.double(), w_ref.double(), None if b_ref is None else b_ref.double())
    y_ref.backward(grad_y.double())
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(x.grad.double(), x_ref.grad.double(), **tol)
    torch.testing.assert_close(layer.weight.grad.double(), w_ref.grad.double(), **tol)
    assert x.grad.dtype == dtype and layer.weight.grad.dtype == dtype
    if bias:
        torch.testing.assert_close(layer.bias.grad.double(), b_ref.grad.double(), **tol)


def test_gradients_equal_straight_through_formula_exactly_in_fp32():
    layer = BitLinear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    grad_y = torch.randn(5, 8)
    layer(x).backward(grad_y)
    xc, xs = activation_quant(x)
    wc, g = weight_quant(layer.weight)
    torch.testing.assert_close(x.grad, grad_y @ (wc.float() * g), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, grad_y.t() @ (xc.float() / xs), rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, grad_y.sum(0))


def test_under_autocast_the_backward_products_run_in_its_dtype():
    """A float32 input under CPU bfloat16 autocast: both products of the backward in bfloat16 (as nn.Linear's),
    grad_x float32 like the input, grad_W float32 like the weight; the bias gradient stays a float32 sum."""
    layer = BitLinear(64, 32)
    x = torch.randn(9, 64, requires_grad=True)
    grad_y = torch.randn(9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(grad_y)
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    xc, xs = activation_quant(x)
    wc, g = weight_quant(layer.weight)
    gy = grad_y.bfloat16()
    assert torch.equal(x.grad, (gy @ (wc.float() * g).bfloat16()).float())
    assert torch.equal(layer.weight.grad, (gy.t() @ (xc.float() / xs).bfloat16()).float())
    assert torch.equal(layer.bias.grad, grad_y.sum(0))
    x.grad = layer.weight.grad = None
    layer(x).backward(grad_y)  # outside autocast: float32 products again
    torch.testing.assert_close(x.grad, grad_y @ (wc.float() * g), rtol=0, atol=1e-6)


def test_saves_int8_codes_not_the_float_input():
    layer = BitLinear(64, 32)
    x = torch.randn(10, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    params = {p.data_ptr() for p in layer.parameters()}
    activation_saved = [t for t in saved if t.data_ptr() not in params]
    assert any(t.dtype == torch.int8 and t.shape == x.shape for t in activation_saved)
    assert not any(t.is_floating_point() and t.numel() >= x.numel() for t in activation_saved)
    saved_bytes = sum(t.numel() * t.element_size() for t in activation_saved)
    assert saved_bytes <= 0.3 * x.numel() * x.element_size()


def test_from_linear_shares_parameters_and_state_dict_keys():
    lin = nn.Linear(12, 8)
    lin.weight.requires_grad_(False)
    bl = BitLinear.from_linear(lin)
    assert bl.weight is lin.weight and bl.bias is lin.bias
    assert not bl.weight.requires_grad
    assert list(bl.state_dict()) == list(lin.state_dict())
    assert isinstance(bl, nn.Linear)
    r = repr(bl)
    assert "ternary" in r and "int8" in r and "in_features=12" in r


def test_in_layer_rms_norm():
    lin = nn.Linear(16, 8)
    bl = BitLinear.from_linear(lin, use_rms_norm=True, rms_norm_eps=1e-6)
    assert "rms_norm.weight" in bl.state_dict()
    with torch.no_grad():
        bl.rms_norm.weight.copy_(torch.rand(16) + 0.5)
    x = torch.randn(3, 16)
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * bl.rms_norm.weight
    torch.testing.assert_close(bl(x), bitlinear(h, bl.weight, bl.bias))
    x.requires_grad_(True)
    bl(x).sum().backward()
    assert bl.rms_norm.weight.grad is not None and torch.isfinite(x.grad).all()


def test_zero_input_and_zero_weight_give_finite_output_and_grads():
    layer = BitLinear(8, 4)
    with torch.no_grad():
        layer.weight.zero_()
    x = torch.zeros(2, 8, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("bad, match", [
    (torch.tensor(1.0), "at least 2 dims"),
    (torch.randn(8), "at least 2 dims"),
    (torch.randn(2, 7), "in_features=8"),
    (torch.ones(2, 8, dtype=torch.long), "floating-point"),
])
def test_bad_input_messages(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        BitLinear(8, 4)(bad)
