"""Probe of alternatives to two kernel choices, one command on a GPU (results: results/probe_kernels.*).

    cd benchmarks && python probe_kernels.py [--out DIR]

* int8 forward GEMM: the Triton kernel (fused epilogue) vs cuBLASLt ``torch._int_mm`` (int32 output, no
  epilogue) vs a bf16 matmul, at training/prefill shapes;
* packed decode, 1 token: the fused single-launch kernel (quantizes inside) vs activation-quant kernel +
  decode kernel on int8 codes (two launches), both replayed as CUDA graphs over rotated weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import DEV, graph_time
from harness import RESULTS, Bench, time_fn

from bitdistill.kernels import linear, packed
from bitdistill.quant import packing, reference


def _ms(fn) -> float:
    return time_fn(fn, warmup=5, repeats=20, device=DEV).median_ms


def probe_gemm(bench: Bench, m: int, k: int, n: int) -> None:
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
    xc, xs = reference.activation_quant(x)
    wc, g = reference.weight_quant(w)
    wct = wc.t()
    times = {"triton int8 (fused epilogue)": _ms(lambda: linear.int8_ternary_linear(xc, xs, wc, g, None, x.dtype)),
             "torch._int_mm (int32 out)": _ms(lambda: torch._int_mm(xc, wct)),
             "bf16 matmul": _ms(lambda: x @ w.t())}
    for impl, ms in times.items():
        bench.add(probe="int8 gemm", M=m, K=k, N=n, impl=impl, median_ms=ms, TOPS=2 * m * n * k / ms / 1e9)


def probe_decode(bench: Bench, k: int, n: int) -> None:
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    packs = [packing.pack_ternary(torch.randint(-1, 2, (n, k), device=DEV, dtype=torch.int8))
             for _ in range(max(2, (256 << 20) // (n * k // 4)))]
    ws = torch.ones(1, device=DEV)
    calls = [lambda p=p: packed.packed_linear(x, p, ws) for p in packs]
    for fused_max in (4, 0):
        packed.FUSED_QUANT_MAX_M = fused_max
        ms = graph_time(calls)
        bench.add(probe="decode M=1", M=1, K=k, N=n,
                  impl="fused quant (1 launch)" if fused_max else "act-quant + decode (2 launches)",
                  median_ms=ms, GBps=(n * k // 4) / ms / 1e6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    bench = Bench("probe_kernels", results_dir=args.out)
    for m, k, n in [(4096, 4096, 4096), (4096, 4096, 14336), (512, 4096, 14336)]:
        probe_gemm(bench, m, k, n)
    for k, n in [(4096, 4096), (4096, 14336), (14336, 4096)]:
        probe_decode(bench, k, n)
    columns = ["probe", "M", "K", "N", "impl", "median_ms", "TOPS", "GBps"]
    bench.write(columns, title="probe_kernels")
    print(bench.markdown(columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
