"""Triton packed-weight inference (decode GEMV and prefill GEMM) vs the packed reference."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import DEVICE, DTYPES, assert_close, nan_like, rows_with_ties

from bitdistill.kernels import packed as packed_kernels
from bitdistill.quant import packing, reference


def _weights(n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    codes, gamma = reference.weight_quant(w)
    return packing.pack_ternary(codes), (1 / gamma).reshape(1), torch.randn(n, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
# decode kernel up to 16 tokens, GEMM above
@pytest.mark.parametrize("m,k,n", [(1, 130, 36), (3, 72, 68), (16, 130, 36), (17, 72, 68), (40, 130, 36)])
def test_packed_linear_matches_reference(dtype, m, k, n):
    packed, ws, bias = _weights(n, k, dtype)
    x = torch.randn(m, k).to(dtype)
    ref = packing.packed_linear_reference(x, packed, ws, bias)
    out = nan_like((m, n), dtype)
    y = packed_kernels.packed_linear(x.to(DEVICE), packed.to(DEVICE), ws.to(DEVICE), bias.to(DEVICE), out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("m", [2, 20])
def test_packed_linear_3d_no_bias_small_k_and_ties(m):
    packed, ws, _ = _weights(4, 8, torch.float32)
    x = rows_with_ties(m * 2, 8, torch.float32).reshape(2, m, 8)
    ref = packing.packed_linear_reference(x, packed, ws)
    y = packed_kernels.packed_linear(x.to(DEVICE), packed.to(DEVICE), ws.to(DEVICE))
    assert y.shape == (2, m, 4)
    assert_close(y, ref, torch.float32)


def test_packed_linear_empty_non_contiguous_and_misaligned():
    packed, ws, bias = _weights(36, 130, torch.float32)
    packed, ws, bias = packed.to(DEVICE), ws.to(DEVICE), bias.to(DEVICE)
    assert packed_kernels.packed_linear(torch.empty(0, 130, device=DEVICE), packed, ws, bias).shape == (0, 36)
    base = torch.randn(40, 131, device=DEVICE)
    for x in (base[:3, 1:], base.flatten()[1:1 + 20 * 130].view(20, 130), base[:20, :130].t().contiguous().t()):
        ref = packing.packed_linear_reference(x.cpu(), packed.cpu(), ws.cpu(), bias.cpu())
        assert_close(packed_kernels.packed_linear(x, packed, ws, bias), ref, torch.float32)
    wide = torch.zeros(9, 2 * 130, dtype=torch.uint8, device=DEVICE)
    wide[:, ::2] = packed
    strided = wide[:, ::2]  # non-contiguous packed weight
    x = torch.randn(2, 130, device=DEVICE)
    ref = packing.packed_linear_reference(x.cpu(), packed.cpu(), ws.cpu(), bias.cpu())
    assert_close(packed_kernels.packed_linear(x, strided, ws, bias), ref, torch.float32)


def test_packed_linear_rejects_bad_input():
    packed, ws, _ = _weights(36, 130, torch.float32)
    packed, ws = packed.to(DEVICE), ws.to(DEVICE)
    with pytest.raises(ValueError, match="K=130"):
        packed_kernels.packed_linear(torch.randn(2, 128, device=DEVICE), packed, ws)
    with pytest.raises(ValueError, match="uint8"):
        packed_kernels.packed_linear(torch.randn(2, 130, device=DEVICE), packed.to(torch.int8), ws)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        packed_kernels.packed_linear(torch.randn(2, 130, dtype=torch.float64, device=DEVICE), packed, ws)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 512])
def test_packed_linear_large_on_gpu(m):
    packed, ws, bias = _weights(4096, 4096, torch.bfloat16)
    x = torch.randn(m, 4096, dtype=torch.bfloat16)
    ref = packing.packed_linear_reference(x.cuda(), packed.cuda(), ws.cuda(), bias.cuda())
    y = packed_kernels.packed_linear(x.cuda(), packed.cuda(), ws.cuda(), bias.cuda())
    assert_close(y, ref, torch.bfloat16)
