"""Triton training GEMMs vs the reference ops (interpreted on CPU, native on CUDA)."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import DEVICE, DTYPES, assert_close, nan_like

from bitdistill import ops
from bitdistill.kernels import linear
from bitdistill.quant import reference

SHAPES = [(1, 8, 4), (3, 130, 36), (17, 72, 68)]  # (M, K, N): none a multiple of the block sizes


def _inputs(m, k, n, dtype):
    x = torch.randn(m, k).to(dtype)
    w = (torch.randn(n, k) * 0.1).to(dtype)
    b = torch.randn(n).to(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,with_bias", [(1, 8, 4, True), (3, 130, 36, False), (17, 72, 68, True)])
def test_forward_gemm_matches_reference(dtype, m, k, n, with_bias):
    x, w, b = _inputs(m, k, n, dtype)
    b = b if with_bias else None
    xc, xs = reference.activation_quant(x)
    wc, g = reference.weight_quant(w)
    ref = ops._int8_ternary_linear_reference(xc, xs, wc, g, b, dtype)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = nan_like((m, n), dtype)
    y = linear.int8_ternary_linear(dev(xc), dev(xs), dev(wc), dev(g), dev(b), dtype, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("gemm", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_grad_input_matches_ste_formula(dtype, m, k, n, gemm):
    _, w, _ = _inputs(m, k, n, dtype)
    gy = torch.randn(m, n).to(dtype)
    wc, g = reference.weight_quant(w)
    ref = gy.double() @ (wc.double() * g.double())  # grad_x = grad_y @ (T * gamma), in float64
    out = nan_like((m, k), dtype)
    gx = linear.ternary_grad_input(gy.to(DEVICE), w.to(DEVICE), g.to(DEVICE), out=out, gemm=gemm)
    assert gx.data_ptr() == out.data_ptr()
    assert_close(gx, ref.to(dtype), dtype)
    assert_close(gx, ops._ternary_grad_input_reference(gy, w, g), dtype)


@pytest.mark.parametrize("gemm", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_grad_weight_matches_ste_formula(dtype, m, k, n, gemm):
    x = torch.randn(m, k).to(dtype)
    gy = torch.randn(m, n).to(dtype)
    xc, xs = reference.activation_quant(x)
    ref = gy.double().t() @ (xc.double() / xs.double())  # grad_W = grad_y^T @ x_q, in float64
    out = nan_like((n, k), dtype)
    gw = linear.int8_grad_weight(gy.to(DEVICE), xc.to(DEVICE), xs.to(DEVICE), out=out, gemm=gemm)
    assert gw.data_ptr() == out.data_ptr()
    assert_close(gw, ref.to(dtype), dtype)
    assert_close(gw, ops._int8_grad_weight_reference(gy, xc, xs), dtype)


def test_empty_batch_and_non_contiguous_inputs():
    x, w, _ = _inputs(5, 72, 36, torch.float32)
    xc, xs = reference.activation_quant(x)
    wc, g = reference.weight_quant(w)
    y = linear.int8_ternary_linear(xc[:0].to(DEVICE), xs[:0].to(DEVICE), wc.to(DEVICE), g.to(DEVICE), None,
                                   torch.float32)
    assert y.shape == (0, 36)
    gw = linear.int8_grad_weight(torch.empty(0, 36, device=DEVICE), xc[:0].to(DEVICE), xs[:0].to(DEVICE))
    assert gw.shape == (36, 72) and (gw == 0).all()
    gy_t = torch.randn(36, 5).t()  # non-contiguous grad_y
    gx = linear.ternary_grad_input(gy_t.to(DEVICE), w.to(DEVICE), g.to(DEVICE))
    assert_close(gx, ops._ternary_grad_input_reference(gy_t.contiguous(), w, g), torch.float32)
    w_t = w.t().contiguous().t()  # Conv1D-style view
    gx = linear.ternary_grad_input(gy_t.to(DEVICE), w_t.to(DEVICE), g.to(DEVICE))
    assert_close(gx, ops._ternary_grad_input_reference(gy_t.contiguous(), w, g), torch.float32)


def test_backward_gemm_choice(monkeypatch):
    monkeypatch.delenv("BITDISTILL_BACKWARD_GEMM", raising=False)
    assert linear.backward_gemm() == "cublas"
    monkeypatch.setenv("BITDISTILL_BACKWARD_GEMM", "Triton")
    assert linear.backward_gemm() == "triton"
    monkeypatch.setenv("BITDISTILL_BACKWARD_GEMM", "magic")
    with pytest.raises(ValueError, match="BITDISTILL_BACKWARD_GEMM='magic'"):
        linear.backward_gemm()


def test_bad_inputs_raise_clear_errors():
    xc = torch.zeros(2, 8, dtype=torch.int8, device=DEVICE)
    xs = torch.ones(2, 1, device=DEVICE)
    wc = torch.zeros(4, 8, dtype=torch.int8, device=DEVICE)
    g = torch.ones((), device=DEVICE)
    with pytest.raises(ValueError, match="w_codes must be int8"):
        linear.int8_ternary_linear(xc, xs, wc.float(), g, None, torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        linear.int8_ternary_linear(xc, xs, wc, g, None, torch.float64)
    with pytest.raises(TypeError, match="grad_y"):
        linear.int8_grad_weight(torch.zeros(2, 4, dtype=torch.float64, device=DEVICE), xc, xs)


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bitlinear_train_step_on_gpu_matches_reference_backend(dtype, gemm, monkeypatch):
    from bitdistill import BitLinear

    torch.manual_seed(0)
    layer = BitLinear(1000, 520, bias=True, device="cuda", dtype=dtype)
    x = torch.randn(3, 301, 1000, device="cuda", dtype=dtype, requires_grad=True)
    proj = torch.randn(3, 301, 520, device="cuda")  # O(1) gradients (no float16 subnormals)

    def step():
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        (y.float() * proj).sum().backward()
        return y.detach(), x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()

    monkeypatch.setenv("BITDISTILL_BACKWARD_GEMM", gemm)
    got = step()
    monkeypatch.setenv("BITDISTILL_BACKEND", "reference")
    want = step()
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, dtype)


@pytest.mark.gpu
def test_large_gemms_on_gpu():
    torch.manual_seed(0)
    m, k, n = 1000, 4096, 1536
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    xc, xs = reference.activation_quant(x)
    wc, g = reference.weight_quant(w)
    y = linear.int8_ternary_linear(xc, xs, wc, g, None, torch.bfloat16)
    assert_close(y, ops._int8_ternary_linear_reference(xc, xs, wc, g, None, torch.bfloat16), torch.bfloat16)
    gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    for gemm in ("triton", "cublas"):
        assert_close(linear.ternary_grad_input(gy, w, g, gemm=gemm), ops._ternary_grad_input_reference(gy, w, g),
                     torch.bfloat16)
        assert_close(linear.int8_grad_weight(gy, xc, xs, gemm=gemm), ops._int8_grad_weight_reference(gy, xc, xs),
                     torch.bfloat16)
