"""W2A8 decode GEMV/GEMM: CUDA extension vs Triton packed GEMV (if present) vs bf16 F.linear.

Shapes are the projections of Llama-3-8B, Qwen2.5-1.5B/7B and Phi-3-mini, M = 1..16 tokens. Every
impl is timed as CUDA-graph replays of a run of calls over rotating weight copies (more bytes than
L2 holds), so a figure is the per-call time a graph-captured decode step sees, cache-cold; the
CUDA kernel's eager per-call time (launch overhead included) is reported too. The device-to-device
copy bandwidth measured in the same run is the ceiling for ``cuda_GBps`` (packed weight bytes plus
activations and outputs per call over the time).

    python benchmarks/bench_cuda_gemv.py [--quick] [--out DIR]

Rows go to benchmarks/results/cuda_gemv.jsonl (+ .md), the launch-configuration sweep to
cuda_gemv_tuning.jsonl (+ .md) and the copy bandwidth to cuda_d2d.jsonl (+ .md).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, Bench, cuda_graph_time_ms, time_fn

from bitdistill import cuda_ext
from bitdistill.quant import pack_ternary, packed_linear_reference

SHAPES = [  # (model, projection, out_features N, in_features K)
    ("llama-3-8b", "q/o_proj", 4096, 4096),
    ("llama-3-8b", "k/v_proj", 1024, 4096),
    ("llama-3-8b", "gate/up_proj", 14336, 4096),
    ("llama-3-8b", "down_proj", 4096, 14336),
    ("qwen2.5-1.5b", "q/o_proj", 1536, 1536),
    ("qwen2.5-1.5b", "k/v_proj", 256, 1536),
    ("qwen2.5-1.5b", "gate/up_proj", 8960, 1536),
    ("qwen2.5-1.5b", "down_proj", 1536, 8960),
    ("qwen2.5-7b", "q/o_proj", 3584, 3584),
    ("qwen2.5-7b", "k/v_proj", 512, 3584),
    ("qwen2.5-7b", "gate/up_proj", 18944, 3584),
    ("qwen2.5-7b", "down_proj", 3584, 18944),
    ("phi-3-mini", "qkv_proj", 9216, 3072),
    ("phi-3-mini", "o_proj", 3072, 3072),
    ("phi-3-mini", "gate_up_proj", 16384, 3072),
    ("phi-3-mini", "down_proj", 3072, 8192),
]
MS = [1, 2, 4, 8, 16]
ROTATE_BYTES = 256 * 2**20  # > 4x the H100's 50 MB L2
CALLS_PER_GRAPH = 20


def triton_packed_linear() -> Callable | None:
    """The Triton packed GEMV of ``bitdistill.kernels`` if this checkout has one, else None."""
    try:
        from bitdistill.kernels.packed import packed_linear
    except ImportError:
        return None
    return packed_linear


def graph_time_us(make_call: Callable[[int], Callable[[], object]], copies: int, repeats: int) -> float:
    """Per-call time of CALLS_PER_GRAPH calls (rotating over ``copies`` weight sets) captured in one graph."""
    calls = [make_call(i % copies) for i in range(max(CALLS_PER_GRAPH, copies))]
    return cuda_graph_time_ms(calls, repeats=repeats) * 1e3


def d2d_bandwidth(bench: Bench) -> float:
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=3, repeats=20, device="cuda")
    gbps = 2 * n / (t.median_ms * 1e-3) / 1e9
    bench.add(what="device-to-device copy, 1 GiB", bytes_moved=2 * n, median_ms=t.median_ms, GBps=gbps)
    return gbps


def bench_shape(bench: Bench, tuning: Bench, model: str, proj: str, n: int, k: int, ms: list[int],
                triton_fn: Callable | None, peak_gbps: float, repeats: int, tune: bool) -> None:
    """Rows for one projection shape at every M (and the launch-configuration sweep at M = 1, 16)."""
    packed_bytes = n // 4 * k
    p_copies = max(2, min(64, math.ceil(ROTATE_BYTES / packed_bytes)))
    w_copies = max(2, min(64, math.ceil(ROTATE_BYTES / (2 * n * k))))
    packed = [pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda")) for _ in range(p_copies)]
    wscale = torch.tensor([1.7], device="cuda")
    wbf = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(w_copies)]
    num_configs = cuda_ext.load().num_configs
    for m in ms:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")

        def cuda_call(i: int, config: int = -1, splits: int = -1, x=x):
            return lambda: cuda_ext.packed_linear_cuda(x, packed[i], wscale, config=config, splits=splits)

        want = packed_linear_reference(x, packed[0], wscale).float()
        got = cuda_ext.packed_linear_cuda(x, packed[0], wscale).float()
        err = ((got - want).norm() / want.norm()).item()
        cuda_us = graph_time_us(cuda_call, p_copies, repeats)
        bf16_us = graph_time_us(lambda i, x=x: lambda: F.linear(x, wbf[i]), w_copies, repeats)
        eager = time_fn(cuda_call(0), warmup=3, repeats=repeats, device="cuda")
        triton_us = None
        if triton_fn is not None:
            triton_us = graph_time_us(lambda i, x=x: lambda: triton_fn(x, packed[i], wscale, None), p_copies, repeats)
        moved = packed_bytes + 2 * m * k + 2 * m * n
        gbps = moved / (cuda_us * 1e-6) / 1e9
        row = bench.add(model=model, proj=proj, N=n, K=k, M=m, bf16_us=bf16_us, cuda_us=cuda_us,
                        cuda_eager_us=eager.median_ms * 1e3, triton_us=triton_us, cuda_vs_bf16=bf16_us / cuda_us,
                        triton_vs_bf16=None if triton_us is None else bf16_us / triton_us,
                        cuda_vs_triton=None if triton_us is None else triton_us / cuda_us,
                        cuda_GBps=gbps, cuda_pct_of_d2d=100 * gbps / peak_gbps, rel_err_vs_ref=err)
        print(" ".join(f"{k_}={v:.4g}" if isinstance(v, float) else f"{k_}={v}" for k_, v in row.items()
                       if k_ not in bench.env), flush=True)
        if m in (1, 16):
            for pdl, fuse in ((True, True), (False, False)):
                us = graph_time_us(lambda i, x=x, p=pdl, f=fuse: lambda: cuda_ext.packed_linear_cuda(
                    x, packed[i], wscale, pdl=p, fuse=f), p_copies, 10)
                tuning.add(model=model, proj=proj, N=n, K=k, M=m, config=-1, splits=-1, pdl=pdl, fuse=fuse,
                           cuda_us=us, vs_default=cuda_us / us)
            for config in range(num_configs) if tune else ():
                for splits in (1, 2):
                    us = graph_time_us(lambda i, c=config, s=splits: cuda_call(i, c, s), p_copies, 10)
                    tuning.add(model=model, proj=proj, N=n, K=k, M=m, config=config, splits=splits, pdl=True,
                               fuse=False, cuda_us=us, vs_default=cuda_us / us)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, M in {1, 16}")
    parser.add_argument("--out", type=Path, help="also copy the result files into this folder")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-tuning", action="store_true", help="skip the launch-configuration sweep")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda_gemv: needs a CUDA device", file=sys.stderr)
        return 2
    if not cuda_ext.is_available():
        print(f"bench_cuda_gemv: {cuda_ext.BUILD_HINT}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    shapes = SHAPES[:2] if args.quick else SHAPES
    ms = [1, 16] if args.quick else MS
    triton_fn = triton_packed_linear()

    d2d = Bench("cuda_d2d")
    peak = d2d_bandwidth(d2d)
    print(f"device-to-device copy: {peak:.0f} GB/s (read + write) on {torch.cuda.get_device_name(0)}")

    bench = Bench("cuda_gemv")
    tuning = Bench("cuda_gemv_tuning")
    for model, proj, n, k in shapes:
        bench_shape(bench, tuning, model, proj, n, k, ms, triton_fn, peak, args.repeats, not args.no_tuning)
        torch.cuda.empty_cache()

    note = ("Per-call times in microseconds, median of CUDA-graph replays of 20 calls over rotating weight copies "
            "(cache-cold); `cuda_eager_us` is one eager call timed with events (launch overhead included). "
            "Ratios are against bf16 `F.linear` measured in the same run. `cuda_GBps` = (packed weight + x + y "
            f"bytes) / time; the device-to-device copy ran at {peak:.0f} GB/s (read + write) in this run.")
    cols = ["model", "proj", "N", "K", "M", "bf16_us", "cuda_us", "triton_us", "cuda_vs_bf16", "triton_vs_bf16",
            "cuda_vs_triton", "cuda_eager_us", "cuda_GBps", "cuda_pct_of_d2d", "rel_err_vs_ref"]
    written = [bench.write(cols, title="W2A8 decode GEMV: CUDA vs Triton vs bf16 F.linear", note=note),
               tuning.write(["model", "proj", "N", "K", "M", "config", "splits", "pdl", "fuse", "cuda_us", "vs_default"],
                            title="CUDA W2A8 launch configurations (config index, K splits; -1 = heuristic; fuse: single "
                                  "kernel allowed for M <= 8)"),
               d2d.write(["what", "bytes_moved", "median_ms", "GBps"], title="Device-to-device copy bandwidth")]
    print(bench.markdown(cols, title="W2A8 decode GEMV", note=note))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for md in written:
            for f in (md, md.with_suffix(".jsonl")):
                shutil.copy(f, args.out / f.name)
    print(f"results in {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
