"""Packing layout, exact round trips, and the CPU implementation of ``bitdistill::packed_linear``."""

from __future__ import annotations

import pytest
import torch

from bitdistill import cpu_ext, ops
from bitdistill.nn import BitLinear, PackedBitLinear
from bitdistill.quant.packing import pack_ternary, packed_linear_reference, unpack_ternary

SHAPES = [(4, 1), (4, 7), (8, 2), (12, 33), (64, 64), (128, 31), (256, 96), (1024, 5), (36, 1000)]


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_exact(shape):
    codes = torch.randint(-1, 2, shape, dtype=torch.int8)
    before = codes.clone()
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0] // 4, shape[1])
    assert torch.equal(unpack_ternary(packed), codes)
    assert torch.equal(codes, before)
    assert torch.equal(pack_ternary(unpack_ternary(packed)), packed)


def test_hand_worked_layout():
    # T [8, 2], P = 2; c = T + 1; packed[r] = c[r] | c[2 + r] << 2 | c[4 + r] << 4 | c[6 + r] << 6.
    t = torch.tensor([[1, -1], [0, 0], [-1, 1], [1, 0], [0, 1], [-1, -1], [1, 1], [0, -1]], dtype=torch.int8)
    # column 0, row 0: c0=2, c2=0, c4=1, c6=2 -> 0b10_01_00_10; column 1: c0=0, c2=2, c4=2, c6=2 -> 0b10_10_10_00
    # column 0, row 1: c1=1, c3=2, c5=0, c7=1 -> 0b01_00_10_01; column 1: c1=1, c3=1, c5=0, c7=0 -> 0b00_00_01_01
    expected = torch.tensor([[0b10010010, 0b10101000], [0b01001001, 0b00000101]], dtype=torch.uint8)
    assert torch.equal(pack_ternary(t), expected)
    assert torch.equal(unpack_ternary(expected), t)


def test_unpack_rejects_code_three():
    with pytest.raises(ValueError, match="corrupt"):
        unpack_ternary(torch.tensor([[0b11]], dtype=torch.uint8))


def test_pack_rejects_rows_not_multiple_of_four():
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_ternary(torch.zeros(6, 3, dtype=torch.int8))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(4, 1), (12, 33), (64, 96), (128, 100)])
def test_cpu_packed_linear_matches_reference(monkeypatch, native, dtype, n, k):
    if native and not cpu_ext.native_available():
        pytest.skip("no C compiler: the native kernel is unavailable")
    if not native:
        monkeypatch.setattr(cpu_ext, "NATIVE_MAX_TOKENS", -1)
    packed = pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8))
    scale = torch.tensor([2.7])
    for m in (1, 3, 17):
        x = (torch.randn(m, k) * 4).to(dtype)
        for bias in (None, torch.randn(n).to(dtype)):
            got = cpu_ext.packed_linear_cpu(x, packed, scale, bias)
            assert got.dtype == dtype
            assert torch.equal(got, packed_linear_reference(x, packed, scale, bias))


def test_tiled_path_bounds_its_tile(monkeypatch):
    monkeypatch.setattr(cpu_ext, "TILE_BYTES", 4 * 40 * 4)  # one packed row (4 weight rows) of K=40 per tile
    packed = pack_ternary(torch.randint(-1, 2, (16, 40), dtype=torch.int8))
    x_codes = torch.randint(-128, 128, (5, 40), dtype=torch.int8)
    expected = x_codes.float() @ unpack_ternary(packed, torch.float32).t()
    assert torch.equal(cpu_ext._tiled_int_mm(x_codes, packed), expected)


def test_native_int_mm_exact_on_extremes():
    if not cpu_ext.native_available():
        pytest.skip("no C compiler: the native kernel is unavailable")
    k = 4099
    codes = torch.ones(8, k, dtype=torch.int8)
    codes[4:] = -1
    x = torch.full((2, k), -128, dtype=torch.int8)
    x[1] = 127
    got = cpu_ext.packed_int_mm(x, pack_ternary(codes))
    assert torch.equal(got.long(), (x.long() @ codes.long().t()))


def test_op_dispatches_to_cpu_impl():
    packed = pack_ternary(torch.randint(-1, 2, (32, 48), dtype=torch.int8))
    x, scale, bias = torch.randn(3, 48), torch.tensor([0.5]), torch.randn(32)
    assert torch.equal(ops.packed_linear(x, packed, scale, bias), packed_linear_reference(x, packed, scale, bias))


@pytest.mark.parametrize("use_rms_norm", [False, True])
def test_packed_module_matches_bitlinear(use_rms_norm):
    layer = BitLinear(48, 32, bias=True, use_rms_norm=use_rms_norm)
    if use_rms_norm:
        layer.rms_norm.weight.data.uniform_(0.5, 1.5)
    weight_before = layer.weight.detach().clone()
    packed = PackedBitLinear.from_bitlinear(layer)
    assert torch.equal(layer.weight, weight_before)
    assert not any(p.requires_grad for p in packed.parameters())
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        ref, got = layer(x), packed(x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    keys = {"weight", "weight_scale", "bias"} | ({"rms_norm.weight"} if use_rms_norm else set())
    assert set(packed.state_dict()) == keys


def test_packed_module_to_bitlinear_keeps_codes():
    layer = BitLinear(40, 16, bias=False)
    packed = PackedBitLinear.from_bitlinear(layer)
    again = PackedBitLinear.from_bitlinear(packed.to_bitlinear())
    assert torch.equal(again.weight, packed.weight)
    torch.testing.assert_close(again.weight_scale, packed.weight_scale, rtol=1e-6, atol=0)


def test_packed_module_rejects_bad_input():
    packed = PackedBitLinear(8, 4)
    with pytest.raises(ValueError, match="in_features=8"):
        packed(torch.randn(2, 7))
    with pytest.raises(ValueError, match="out_features % 4 == 0"):
        PackedBitLinear(8, 6)


def test_packed_module_compiles():
    packed = PackedBitLinear.from_bitlinear(BitLinear(32, 16))
    x = torch.randn(3, 32)
    compiled = torch.compile(packed, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), packed(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5])
def test_shared_input_linears_equal_separate_calls(dtype, m):
    """One native call for linears sharing an input: every output bit-equal to its own packed_linear."""
    k = 100
    weights = [(pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8)), torch.tensor([s]),
                None if b is None else b.to(dtype)) for n, s, b in
               [(64, 2.7, torch.randn(64)), (12, 0.3, None), (40, 11.0, torch.randn(40))]]
    x = (torch.randn(m, k) * 4).to(dtype)
    before = x.clone()
    outs = cpu_ext.SharedInputPackedLinears(weights)(x)
    assert torch.equal(x, before)
    for got, (p, s, b) in zip(outs, weights, strict=True):
        assert got.dtype == dtype and torch.equal(got, packed_linear_reference(x, p, s, b))


def test_shared_input_linears_refuses_mixed_in_features():
    a = pack_ternary(torch.zeros(4, 8, dtype=torch.int8))
    b = pack_ternary(torch.zeros(4, 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="same in_features"):
        cpu_ext.SharedInputPackedLinears([(a, torch.ones(1), None), (b, torch.ones(1), None)])
