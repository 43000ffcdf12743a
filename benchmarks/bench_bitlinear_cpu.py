"""CPU micro-benchmark: BitLinear forward+backward vs nn.Linear and the naive detach-trick fake-quant layer.

Run from the repository root::

    python benchmarks/bench_bitlinear_cpu.py            # writes benchmarks/results/bitlinear_cpu.{jsonl,md}

For each transformer shape (tokens x in -> out, float32) it measures, in the same run:

- time of one forward+backward (median of repeats), as a ratio to ``nn.Linear``; ``BitLinear`` forms the
  forward's exact integer product with the int8 GEMM (``torch._int_mm``) where that is exact on this CPU,
  ``BitLinear, float32 product`` with a float32 matmul (``BITDISTILL_BACKEND=reference``; same output);
- saved-activation memory: bytes autograd keeps between forward and backward, parameters excluded
  (counted with ``torch.autograd.graph.saved_tensors_hooks``), as a ratio to ``nn.Linear``;
- peak memory: growth of the process's resident high-water mark over one forward+backward, each
  measured in a fresh process (glibc told to serve large blocks with mmap, so freed memory is
  returned and the mark counts live bytes), as a ratio to ``nn.Linear``.

Candidates are timed round-robin (one step of each per round) so that load on the machine hits
all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench, time_interleaved

from bitdistill import BitLinear
from bitdistill.quant import fake_quant_activation, fake_quant_weight

# (name, tokens, in_features, out_features)
SHAPES = [
    ("SmolLM2-135M up_proj", 2048, 576, 1536),
    ("Llama-3.2-1B q_proj", 1024, 2048, 2048),
    ("Llama-3-8B o_proj", 512, 4096, 4096),
]


class NaiveFakeQuantLinear(nn.Linear):
    """What most BitNet code does: ``F.linear(x + (q(x) - x).detach(), W + (q(W) - W).detach())``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = x + (fake_quant_activation(x) - x).detach()
        wq = self.weight + (fake_quant_weight(self.weight) - self.weight).detach()
        return F.linear(xq, wq, self.bias)


class Float32ProductBitLinear(BitLinear):
    """BitLinear with the forward's integer product ``X_q @ T^T`` formed as a float32 matmul
    (``BITDISTILL_BACKEND=reference``) instead of the int8 GEMM: the same output bit for bit, the old speed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with mock.patch.dict(os.environ, {"BITDISTILL_BACKEND": "reference"}):
            return super().forward(x)


IMPLS = {"nn.Linear": nn.Linear, "naive fake-quant": NaiveFakeQuantLinear,
         "BitLinear, float32 product": Float32ProductBitLinear, "BitLinear": BitLinear}


def make(impl: str, m: int, k: int, n: int):
    torch.manual_seed(0)
    layer = IMPLS[impl](k, n)
    x = torch.randn(m, k, requires_grad=True)
    return layer, x


def step(layer, x):
    layer(x).sum().backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None


def saved_activation_bytes(layer, x) -> int:
    params = {p.data_ptr() for p in layer.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return total


def peak_rss_growth(impl: str, m: int, k: int, n: int) -> int:
    """Resident high-water growth (bytes) over one fwd+bwd, in a fresh process."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            f"import bench_bitlinear_cpu as b, harness, json; layer, x = b.make({impl!r}, {m}, {k}, {n}); "
            "b.step(layer, x); print(json.dumps(harness.peak_memory_growth(lambda: b.step(layer, x))))")
    # Large blocks through mmap, so freed memory leaves the process and the high-water mark counts live bytes.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    return int(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = Bench("bitlinear_cpu")
    for shape_name, m, k, n in SHAPES:
        base = None
        made = {impl: make(impl, m, k, n) for impl in IMPLS}
        timings = time_interleaved({impl: (lambda lx=lx: step(*lx)) for impl, lx in made.items()},
                                   repeats=args.repeats)
        for impl, (layer, x) in made.items():
            t = timings[impl]
            saved = saved_activation_bytes(layer, x)
            peak = peak_rss_growth(impl, m, k, n)
            if base is None:
                base = (t.median_ms, saved, peak)
            row = bench.add(shape=f"{m}x{k}->{n}", model=shape_name, impl=impl, dtype="float32",
                            fwd_bwd_ms=t.median_ms, spread=t.spread, time_vs_linear=t.median_ms / base[0],
                            saved_act_MB=saved / 2**20, saved_act_vs_linear=saved / base[1],
                            peak_MB=peak / 2**20, peak_vs_linear=peak / base[2] if base[2] else float("nan"))
            print(json.dumps({k_: row[k_] for k_ in ("shape", "impl", "fwd_bwd_ms", "time_vs_linear",
                                                      "saved_act_vs_linear", "peak_vs_linear")}))
    md = bench.write(
        columns=["model", "shape", "impl", "fwd_bwd_ms", "spread", "time_vs_linear", "saved_act_MB",
                 "saved_act_vs_linear", "peak_MB", "peak_vs_linear"],
        title="BitLinear forward+backward on CPU (float32)",
        note=("Ratios are against `nn.Linear` measured in the same run. `saved_act` = bytes autograd keeps "
              "between forward and backward (parameters excluded); `peak` = growth of the process's resident "
              "high-water mark over one forward+backward in a fresh process. Reproduce: "
              "`python benchmarks/bench_bitlinear_cpu.py`."))
    print(md.read_text())


if __name__ == "__main__":
    main()
