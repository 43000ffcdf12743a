"""Dispatch of the custom ops: reference on CPU, backend choice, no Triton at import, opcheck."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bitdistill import ops
from bitdistill.quant import packing, reference


def test_import_bitdistill_does_not_import_triton():
    code = "import sys, bitdistill, bitdistill.ops; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("value,expected", [("reference", "reference"), ("REFERENCE", "reference"),
                                            ("triton", "triton"), ("auto", "triton"), ("", "triton")])
def test_backend_from_environment(monkeypatch, value, expected):
    monkeypatch.setenv("BITDISTILL_BACKEND", value)
    assert ops.backend() == expected


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("BITDISTILL_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="BITDISTILL_BACKEND='cuda-magic' is not a backend"):
        ops.backend()


_ONE_SCALE = torch.ones(1)


def test_packed_linear_picks_the_cuda_extension_for_decode_when_built(monkeypatch):
    from bitdistill import cuda_ext

    packed = torch.zeros(1, 8, dtype=torch.uint8)
    monkeypatch.delenv("BITDISTILL_BACKEND", raising=False)
    monkeypatch.setattr(cuda_ext, "is_available", lambda: True)
    assert ops._packed_linear_backend(torch.randn(16, 8), packed, _ONE_SCALE) is cuda_ext.packed_linear_cuda
    assert ops._packed_linear_backend(torch.randn(17, 8), packed, _ONE_SCALE).__module__ == "bitdistill.kernels.packed"
    assert ops._packed_linear_backend(torch.randn(1, 6), packed, _ONE_SCALE).__module__ == "bitdistill.kernels.packed"
    monkeypatch.setattr(cuda_ext, "is_available", lambda: False)
    assert ops._packed_linear_backend(torch.randn(1, 8), packed, _ONE_SCALE).__module__ == "bitdistill.kernels.packed"


def test_forcing_the_cuda_backend_without_the_extension_names_the_build(monkeypatch):
    from bitdistill import cuda_ext

    monkeypatch.setenv("BITDISTILL_BACKEND", "cuda")
    monkeypatch.setattr(cuda_ext, "_import", lambda: None)
    with pytest.raises(RuntimeError, match="not built"):
        ops._packed_linear_backend(torch.randn(1, 8), torch.zeros(1, 8, dtype=torch.uint8), _ONE_SCALE)
    assert ops.backend() == "triton"


def test_packed_linear_backend_choice(monkeypatch):
    x = torch.randn(2, 8)
    packed = torch.zeros(1, 8, dtype=torch.uint8)
    monkeypatch.delenv("BITDISTILL_BACKEND", raising=False)
    impl = ops._packed_linear_backend(x, packed, _ONE_SCALE)
    assert impl.__module__ == "bitdistill.kernels.packed"
    assert ops._packed_linear_backend(x.double(), packed, _ONE_SCALE) is packing.packed_linear_reference
    monkeypatch.setenv("BITDISTILL_BACKEND", "reference")
    assert ops._packed_linear_backend(x, packed, _ONE_SCALE) is packing.packed_linear_reference


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_per_row_scales_run_the_reference_whatever_the_backend(monkeypatch, backend):
    """The Triton and CUDA kernels take one weight scale per tensor: per-row scales are routed to the reference."""
    from bitdistill import cuda_ext

    monkeypatch.setenv("BITDISTILL_BACKEND", backend)
    monkeypatch.setattr(cuda_ext, "is_available", lambda: True)
    rows = torch.ones(4)
    assert ops._packed_linear_backend(torch.randn(1, 8), torch.zeros(1, 8, dtype=torch.uint8), rows) is \
        packing.packed_linear_reference
    assert not ops._per_tensor(rows) and ops._per_tensor(torch.ones(())) and ops._per_tensor(_ONE_SCALE)


def test_cpu_ops_are_the_reference():
    x = torch.randn(3, 72)
    w = torch.randn(36, 72)
    xc, xs = ops.activation_quant(x)
    rc, rs = reference.activation_quant(x)
    assert torch.equal(xc, rc) and torch.equal(xs, rs)
    wc, g = ops.weight_quant(w)
    rwc, rg = reference.weight_quant(w)
    assert torch.equal(wc, rwc) and torch.equal(g, rg)
    packed = packing.pack_ternary(wc)
    torch.testing.assert_close(ops.packed_linear(x, packed, (1 / g).reshape(1), None),
                               packing.packed_linear_reference(x, packed, (1 / g).reshape(1)))


@pytest.mark.parametrize("m,k,n", [(0, 8, 4), (1, 7, 3), (5, 100, 9), (33, 576, 192),
                                   (2, reference.MAX_EXACT_K + 8, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_int8_ternary_linear_equals_the_reference_bit_for_bit(m, k, n, dtype, with_bias):
    """The CPU kernel's int32 product (``torch._int_mm`` where exact here) gives the reference's output exactly."""
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    xc = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    xc[:, :1] = 127  # the extreme codes BitLinear produces
    wc = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
    xs = torch.rand(m, 1, generator=g) + 0.5
    gamma = torch.tensor(0.037)
    b = torch.randn(n, generator=g) if with_bias else None
    got = ops.int8_ternary_linear(xc, xs, wc, gamma, b, dtype)
    assert got.dtype == dtype
    assert torch.equal(got, ops._int8_ternary_linear_reference(xc, xs, wc, gamma, b, dtype))


def test_cpu_int8_ternary_linear_uses_the_int8_gemm_only_when_exact_and_not_told_reference(monkeypatch):
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or real(a, b))
    xc, xs = ops.activation_quant(torch.randn(4, 64))
    wc, gamma = ops.weight_quant(torch.randn(8, 64))
    expected = ops._int8_ternary_linear_reference(xc, xs, wc, gamma, None, torch.float32)
    monkeypatch.setattr(ops, "cpu_int_mm_exact", lambda: False)
    assert torch.equal(ops.int8_ternary_linear(xc, xs, wc, gamma, None, torch.float32), expected)
    assert calls == []
    monkeypatch.setattr(ops, "cpu_int_mm_exact", lambda: True)
    assert torch.equal(ops.int8_ternary_linear(xc, xs, wc, gamma, None, torch.float32), expected)
    assert calls == [(4, 64)]
    monkeypatch.setenv("BITDISTILL_BACKEND", "reference")
    assert torch.equal(ops.int8_ternary_linear(xc, xs, wc, gamma, None, torch.float32), expected)
    assert calls == [(4, 64)]


def _refusing_int_mm(a, b):
    raise NotImplementedError("_int_mm: no CPU kernel for this shape")


@pytest.mark.parametrize("int_mm", [lambda a, b: (a.float() @ b.float()).clamp(-32768, 32767).int(), _refusing_int_mm],
                         ids=["saturating", "refusing"])
def test_cpu_int_mm_probe_rejects_a_saturating_int8_gemm(monkeypatch, int_mm):
    """A GEMM that saturates 16-bit partial sums (as reported on some AVX2 CPUs), or a build whose CPU
    ``_int_mm`` refuses a shape, keeps the float32 path."""
    ops.cpu_int_mm_exact.cache_clear()
    monkeypatch.setattr(torch, "_int_mm", int_mm)
    try:
        assert ops.cpu_int_mm_exact() is False
    finally:
        monkeypatch.undo()
        ops.cpu_int_mm_exact.cache_clear()


def test_opcheck_all_ops():
    x = torch.randn(3, 40)
    w = torch.randn(8, 40)
    xc, xs = ops.activation_quant(x)
    wc, g = ops.weight_quant(w)
    gy = torch.randn(3, 8)
    b = torch.randn(8)
    cases = [
        (ops.activation_quant, (x,)),
        (ops.weight_quant, (w,)),
        (ops.int8_ternary_linear, (xc, xs, wc, g, b, torch.float32)),
        (ops.ternary_grad_input, (gy, w, g)),
        (ops.int8_grad_weight, (gy, xc, xs)),
        (ops.packed_linear, (x, packing.pack_ternary(wc), (1 / g).reshape(1), b)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_ops_run_triton_and_match_reference_backend(dtype, monkeypatch):
    from kernel_utils import assert_close

    x = torch.randn(33, 520, device="cuda", dtype=dtype)
    w = torch.randn(256, 520, device="cuda", dtype=dtype)
    wc, g = reference.weight_quant(w)
    packed = packing.pack_ternary(wc)
    ws = (1 / g).reshape(1)
    monkeypatch.setenv("BITDISTILL_BACKEND", "triton")
    assert ops._packed_linear_backend(x, packed, _ONE_SCALE).__module__ == "bitdistill.kernels.packed"
    got = [ops.packed_linear(x, packed, ws, None), ops.packed_linear(x[:2], packed, ws, None)]
    xc, xs = ops.activation_quant(x)
    rc, rs = reference.activation_quant(x)
    assert torch.equal(xc, rc) and torch.equal(xs, rs)
    monkeypatch.setenv("BITDISTILL_BACKEND", "reference")
    want = [ops.packed_linear(x, packed, ws, None), ops.packed_linear(x[:2], packed, ws, None)]
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, dtype)
