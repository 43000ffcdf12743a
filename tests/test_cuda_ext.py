"""The optional CUDA extension: import safety and clear errors everywhere; exactness on a GPU.

GPU tests compare with ``packed_linear_reference`` run on the CPU (float32 integer matmul, exact for
K < 2**17) with ``torch.equal``: the kernel does the same float32 operations in the same order, so
any difference means a wrong code, a wrong accumulator or an unwritten output (outputs are poisoned
with NaN before each launch).
"""

from __future__ import annotations

import random

import pytest
import torch

from bitdistill import cuda_ext
from bitdistill.quant import activation_quant, pack_ternary, packed_linear_reference

needs_ext = pytest.mark.skipif(not cuda_ext.is_available(), reason="bitdistill._C is not built or no CUDA device")


def _problem(m: int, n: int, k: int, dtype: torch.dtype, bias: str, device: str = "cuda", scale: float = 1.0):
    x = (torch.randn(m, k) * scale).to(dtype)
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    packed = pack_ternary(codes)
    weight_scale = torch.rand(1) * 4 + 0.25
    b = None
    if bias == "float32":
        b = torch.randn(n)
    elif bias == "same":
        b = torch.randn(n).to(dtype)
    return x, packed, weight_scale, b


def _run(x, packed, weight_scale, b, **kw):
    dev = lambda t: None if t is None else t.cuda()  # noqa: E731
    out = torch.full((x.shape[0], packed.shape[0] * 4), float("nan"), dtype=x.dtype, device="cuda")
    y = cuda_ext.packed_linear_cuda(dev(x), dev(packed), dev(weight_scale), dev(b), out=out, **kw)
    torch.cuda.synchronize()
    assert y.data_ptr() == out.data_ptr()
    return y.cpu()


def test_import_never_needs_the_extension():
    assert isinstance(cuda_ext.is_available(), bool)
    assert "pip install" in cuda_ext.BUILD_HINT


def test_rejects_bad_shapes_before_loading():
    packed = torch.zeros(2, 6, dtype=torch.uint8)
    with pytest.raises(ValueError, match="in_features % 4"):
        cuda_ext.packed_linear_cuda(torch.zeros(1, 6), packed, torch.ones(1))
    with pytest.raises(ValueError, match="2-D"):
        cuda_ext.packed_linear_cuda(torch.zeros(1, 1, 8), packed, torch.ones(1))


@pytest.mark.skipif(cuda_ext._import() is not None, reason="the extension is built here")
def test_missing_extension_names_the_build_command():
    with pytest.raises(RuntimeError, match="pip install"):
        cuda_ext.packed_linear_cuda(torch.zeros(1, 8), torch.zeros(2, 8, dtype=torch.uint8), torch.ones(1))


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("seed", range(24))
def test_matches_reference_bit_for_bit_on_random_shapes(seed):
    rng = random.Random(seed)
    m = rng.choice([1, 1, 2, 3, 5, 8, 13, 16, 17, 40])
    n = 4 * rng.choice([1, 7, 8, 9, 64, 100, 256, 1024])
    k = 4 * rng.choice([1, 3, 15, 16, 25, 100, 384, 1024, 1027, 3584])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    bias = rng.choice(["none", "float32", "same"])
    torch.manual_seed(seed)
    x, packed, ws, b = _problem(m, n, k, dtype, bias, scale=rng.choice([1e-3, 1.0, 30.0]))
    want = packed_linear_reference(x, packed, ws, b)
    for fuse in (True, False):
        got = _run(x, packed, ws, b, fuse=fuse)
        assert not torch.isnan(got).any(), "some outputs were never written"
        assert torch.equal(got, want), (f"M={m} N={n} K={k} {dtype} bias={bias} fuse={fuse}: "
                                        f"max |diff| {(got.float() - want.float()).abs().max()}")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize(("m", "n", "k"), [(1, 4096, 4096), (16, 1024, 14336), (4, 256, 18944), (33, 512, 3072),
                                           (8, 1028, 1100)])
def test_every_config_and_split_gives_the_same_exact_result(m, n, k):
    x, packed, ws, b = _problem(m, n, k, torch.bfloat16, "float32")
    want = packed_linear_reference(x, packed, ws, b)
    for config in range(cuda_ext.load().num_configs):
        for splits in (1, 2, 3, 64):
            for pdl, fuse in ((True, True), (False, False)):
                got = _run(x, packed, ws, b, config=config, splits=splits, pdl=pdl, fuse=fuse)
                assert torch.equal(got, want), f"config={config} splits={splits} pdl={pdl} fuse={fuse}"


@pytest.mark.gpu
@needs_ext
def test_activation_codes_round_half_to_even():
    k = 64
    # amax 127 gives s_x = 1 exactly, so x * s_x lands on .5 ties that rint and floor(x+0.5) disagree on.
    x = torch.tensor([[127.0] + [v + 0.5 for v in range(-31, 31)] + [-127.0]])
    assert x.shape[1] == k
    eye = torch.zeros(4 * k, k, dtype=torch.int8)
    eye[torch.arange(k), torch.arange(k)] = 1  # output j < k returns X_q[:, j]
    packed = pack_ternary(eye)
    ws = torch.ones(1)
    want = packed_linear_reference(x, packed, ws)
    got = _run(x, packed, ws, None)
    assert torch.equal(got, want)
    assert torch.equal(got[0, :k], torch.round(x[0]))


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_activation_codes_equal_the_reference(dtype):
    x = (torch.randn(7, 1000) * torch.logspace(-3, 3, 7).unsqueeze(1)).to(dtype)
    x[3] = 0.0  # all-zero token: the 1e-5 clamp
    x[5] = 0.0
    x[5, :64] = torch.tensor([127.0] + [v + 0.5 for v in range(-31, 31)] + [-127.0]).to(dtype)  # s_x = 1: .5 ties
    codes, scale = cuda_ext.activation_quant_cuda(x.cuda())
    want_codes, want_scale = activation_quant(x)
    assert torch.equal(codes.cpu(), want_codes)
    assert torch.equal(scale.cpu(), want_scale)


@pytest.mark.gpu
@needs_ext
def test_cuda_graph_replay_matches_eager():
    x, packed, ws, _ = _problem(1, 4096, 4096, torch.bfloat16, "none")
    xc, pc, wc = x.cuda(), packed.cuda(), ws.cuda()
    out = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")
    cuda_ext.packed_linear_cuda(xc, pc, wc, out=out)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_ext.packed_linear_cuda(xc, pc, wc, out=out)
    out.fill_(float("nan"))
    xc.copy_(torch.randn_like(xc))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), packed_linear_reference(xc.cpu(), packed, ws))


def test_rejects_mismatched_arguments_before_the_compiled_code():
    x = torch.zeros(1, 8)
    with pytest.raises(ValueError, match=r"uint8 \[out_features / 4, 8\]"):
        cuda_ext.packed_linear_cuda(x, torch.zeros(2, 12, dtype=torch.uint8), torch.ones(1))
    with pytest.raises(ValueError, match="out_features=8"):
        cuda_ext.packed_linear_cuda(x, torch.zeros(2, 8, dtype=torch.uint8), torch.ones(1), torch.zeros(5))


@pytest.mark.gpu
@needs_ext
def test_rejects_tensors_on_other_devices():
    with pytest.raises(ValueError, match="same CUDA device"):
        cuda_ext.packed_linear_cuda(torch.zeros(1, 8, device="cuda"), torch.zeros(2, 8, dtype=torch.uint8),
                                    torch.ones(1, device="cuda"))
