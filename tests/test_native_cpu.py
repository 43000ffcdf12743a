"""The native CPU library (csrc/cpu/): its ctypes mirrors, and every run-time picked kernel against the scalar one."""

from __future__ import annotations

import pytest
import torch

from bitdistill import cpu_ext
from bitdistill.quant.packing import pack_ternary, packed_linear_reference

pytestmark = pytest.mark.skipif(not cpu_ext.native_available(), reason=cpu_ext.native_unavailable_reason())


def _isas() -> list[str]:
    """The kernels this CPU can run (forced_isa caps a request at what the CPU has)."""
    found = []
    for name in cpu_ext.ISA_NAMES:
        with cpu_ext.forced_isa(name) as used:
            if used == name:
                found.append(name)
    return found


def test_ctypes_layouts_equal_the_c_structs():
    assert cpu_ext.native_layout() == cpu_ext.ctypes_layout()
    assert len(cpu_ext.ctypes_layout()) == 5 + sum(len(s._fields_) for s in (
        cpu_ext._Linear, cpu_ext._Norm, cpu_ext._Head, cpu_ext._Layer, cpu_ext._Model))
    assert [n for n, _ in cpu_ext._Linear._fields_] == ["packed", "P", "scale", "bias", "row_scale"]


def test_the_best_kernel_is_picked_by_default():
    assert cpu_ext.cpu_isa() == _isas()[-1]


@pytest.mark.parametrize("k", [1, 31, 64, 100, 577, 2048])
@pytest.mark.parametrize("rows", [4, 16, 28])  # 1, 4 and 7 packed rows: full and partial row tiles
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])  # row tiles (one token), partial and full token tiles
def test_every_kernel_equals_the_scalar_one_bit_for_bit(k, rows, m):
    gen = torch.Generator().manual_seed(k * 100 + rows + m)
    codes = torch.randint(-1, 2, (rows, k), dtype=torch.int8, generator=gen)
    codes[0] = 1  # extremes: all +1 / all -1 rows against all -128 / +127 activations
    codes[1] = -1
    packed = pack_ternary(codes)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    x[0] = -128
    x[-1] = 127 if m > 1 else x[-1]
    expected = x.long() @ codes.long().t()
    with cpu_ext.forced_isa("scalar"):
        scalar = cpu_ext.packed_int_mm(x, packed)
    assert torch.equal(scalar.long(), expected)
    for isa in _isas():
        with cpu_ext.forced_isa(isa):
            assert torch.equal(cpu_ext.packed_int_mm(x, packed), scalar), isa


@pytest.mark.parametrize("m", [1, 4])  # a row tile, a token tile
def test_kernels_are_exact_at_the_widest_input_they_take(m):
    """K = NATIVE_MAX_K with the largest sums there are: all +1 and all -1 rows (code 2: the in-place plane 3 holds
    128) against -128 activations, in every kernel; beyond it the exact tiled path runs."""
    k = cpu_ext.NATIVE_MAX_K
    codes = torch.ones(16, k, dtype=torch.int8)
    codes[1::2] = -1
    packed = pack_ternary(codes)
    x = torch.full((m, k), -128, dtype=torch.int8)
    expected = x.long() @ codes.long().t()
    for isa in _isas():
        with cpu_ext.forced_isa(isa):
            assert torch.equal(cpu_ext.packed_int_mm(x, packed).long(), expected), isa
    wider = pack_ternary(torch.ones(4, k + 64, dtype=torch.int8))
    got = cpu_ext.packed_int_mm(torch.full((1, k + 64), -128, dtype=torch.int8), wider)
    assert got.dtype == torch.float32 and torch.equal(got.long(), torch.full((1, 4), -128 * (k + 64)))  # tiled


@pytest.mark.parametrize("m", [1, 5])
def test_threaded_kernels_equal_the_scalar_one(m):
    """Above the one-thread threshold (packed bytes x tokens >= 64K) the product runs on 2 OpenMP threads; with 131
    packed rows the last row tile is partial."""
    gen = torch.Generator().manual_seed(m)
    codes = torch.randint(-1, 2, (4 * 131, 577), dtype=torch.int8, generator=gen)
    packed = pack_ternary(codes)
    x = torch.randint(-128, 128, (m, 577), dtype=torch.int8, generator=gen)
    assert packed.numel() * m >= 1 << 16
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpu_ext.forced_isa("scalar"):
            scalar = cpu_ext.packed_int_mm(x, packed)
        for isa in _isas():
            with cpu_ext.forced_isa(isa):
                assert torch.equal(cpu_ext.packed_int_mm(x, packed), scalar), isa
    finally:
        torch.set_num_threads(before)
    assert torch.equal(scalar.long(), x.long() @ codes.long().t())


@pytest.mark.parametrize("m", [1, 3, 6])
def test_threaded_linears_equal_the_reference(m):
    """A layer above the one-thread threshold runs on 2 OpenMP threads (row tiles for one token, token tiles for
    more); each kernel's result is the reference's, bit for bit."""
    packed = pack_ternary(torch.randint(-1, 2, (4 * 131, 600), dtype=torch.int8))
    x = torch.randn(m, 600).to(torch.bfloat16)
    assert packed.numel() * m >= 1 << 16
    bias = torch.randn(4 * 131)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for isa in _isas():
            with cpu_ext.forced_isa(isa):
                got = cpu_ext.packed_linear_cpu(x, packed, torch.tensor([1.7]), bias)
            assert torch.equal(got, packed_linear_reference(x, packed, torch.tensor([1.7]), bias)), isa
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("k", [64, 100])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5])
def test_int8_head_kernels_agree_and_approximate_the_float_head(k, tokens):
    """100 rows: a partial group of rows for every group size (16 rows for one token, 8 for two, 4 for 3-4); 5 tokens:
    a group of four and one of one."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(100, k, generator=gen) * 0.05
    x = torch.randn(tokens, k, generator=gen) * 3
    head = cpu_ext.NativeInt8Head(weight)
    with cpu_ext.forced_isa("scalar"):
        scalar = head(x)
    for isa in _isas():
        with cpu_ext.forced_isa(isa):
            got = head(x)
        assert torch.allclose(got, scalar, rtol=1e-5, atol=1e-5 * scalar.abs().max().item()), isa
    exact = x @ weight.t()
    assert scalar.shape == exact.shape == (tokens, 100)
    assert (scalar - exact).abs().max() <= 0.02 * exact.abs().max()


def _random_stack(dtype: torch.dtype, bias: bool, per_row: bool) -> cpu_ext.NativeDecoderStack:
    """Two layers of odd widths (7 and 19 packed rows: partial row tiles), biases and per-row scales as asked."""
    gen = torch.Generator().manual_seed(int(bias) * 2 + int(per_row))
    hidden, heads, kv, d, inter = 28, 4, 2, 8, 76

    def lin(n: int, k: int) -> cpu_ext.NativeLinear:
        scale = torch.rand(n if per_row else 1, generator=gen) + 0.5
        return cpu_ext.NativeLinear(pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=gen)),
                                    scale, torch.randn(n, generator=gen) if bias else None)

    def norm(n: int) -> cpu_ext.NativeNorm:
        return cpu_ext.NativeNorm((1 + 0.1 * torch.randn(n, generator=gen)).to(dtype), 1e-5)

    layers = [cpu_ext.NativeLayer(input_norm=norm(hidden), post_norm=norm(hidden),
                                  qkv=(lin(heads * d, hidden), lin(kv * d, hidden), lin(kv * d, hidden)),
                                  o=lin(hidden, heads * d), mlp_in=(lin(inter, hidden), lin(inter, hidden)),
                                  down=lin(hidden, inter)) for _ in range(2)]
    angles = torch.arange(32)[:, None].float() / (10000 ** (torch.arange(0, d, 2).float() / d))[None]
    angles = torch.cat([angles, angles], -1)
    return cpu_ext.NativeDecoderStack(layers, final_norm=norm(hidden), n_heads=heads, n_kv=kv, head_dim=d,
                                      scaling=d ** -0.5, act="silu", cos=angles.cos().to(dtype),
                                      sin=angles.sin().to(dtype), dtype=dtype, max_batch=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("bias", "per_row"), [(False, False), (True, True)])
def test_decoder_stack_gives_the_same_bits_under_every_kernel(dtype, bias, per_row):
    """The stack's hidden states (no head: the int8 head sums its blocks in another order per kernel) are the same
    bits whichever kernels run its projections and their epilogues: one token (row tiles), a partial and a full
    token tile (3 and 4 sequences), 5 sequences (a full tile and one more), and a 6-token prompt."""
    stack = _random_stack(dtype, bias, per_row)
    gen = torch.Generator().manual_seed(7)
    cases = [(torch.randn(b, t, 28, generator=gen).to(dtype), t) for b, t in ((1, 1), (3, 1), (4, 1), (5, 1), (2, 6))]
    results = {}
    for isa in _isas():
        with cpu_ext.forced_isa(isa):
            results[isa] = [stack.forward(h, 0, all_positions=True)[0].clone() for h, _ in cases]
    for isa, got in results.items():
        for (h, _), a, b in zip(cases, got, results["scalar"], strict=True):
            assert torch.isfinite(a.float()).all()
            assert torch.equal(a, b), (isa, tuple(h.shape))
