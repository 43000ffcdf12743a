"""Packed ternary linear layer on CPU: bitdistill ``PackedBitLinear`` vs transformers' packed ``BitLinear``
vs ``nn.Linear``, at 1 and 128 tokens, three shapes, same run.

* ``nn.Linear fp32`` / ``nn.Linear bf16``: dense layers of the same shape (the full-precision baseline),
* ``transformers BitLinear``: ``transformers.integrations.bitnet.BitLinear`` holding the same packed
  bytes (what ``from_pretrained`` builds for a packed folder; it unpacks the weight on every call),
* ``bitdistill PackedBitLinear``: our module on the same packed bytes (native kernel up to 16 tokens,
  tiled float32 GEMM beyond).

Inputs are bf16 for the bf16 rows and our module (its output dtype follows the input), fp32 for the
fp32 row. Run from the repository root::

    python benchmarks/bench_packed_cpu.py --threads 2

Writes ``benchmarks/results/packed_cpu.{jsonl,md}``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, time_fn

SHAPES = [(576, 1536), (1536, 576), (2048, 2048)]  # (in, out): SmolLM2 up_proj, down_proj, a 1B-class projection


def main() -> None:
    from transformers.integrations.bitnet import BitLinear as HFBitLinear

    from bitdistill.cpu_ext import native_available
    from bitdistill.nn import BitLinear, PackedBitLinear

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bench = Bench("packed_cpu")
    for k, n in SHAPES:
        ref = BitLinear(k, n, bias=False)
        ours = PackedBitLinear.from_bitlinear(ref).to(torch.bfloat16)
        ours.weight_scale.data = ours.weight_scale.data.float()
        hf = HFBitLinear(k, n, bias=False, dtype=torch.bfloat16)
        hf.weight.copy_(ours.weight)
        hf.weight_scale.copy_(ours.weight_scale)
        lin32 = torch.nn.Linear(k, n, bias=False)
        lin16 = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
        for tokens in (1, 128):
            x32 = torch.randn(1, tokens, k)
            x16 = x32.to(torch.bfloat16)
            with torch.no_grad():
                torch.testing.assert_close(ours(x16).float(), hf(x16).float(), rtol=0.02, atol=0.05)
                impls = {"nn.Linear fp32": (lin32, x32), "nn.Linear bf16": (lin16, x16),
                         "transformers BitLinear": (hf, x16), "bitdistill PackedBitLinear": (ours, x16)}
                times = {}
                for name, (layer, x) in impls.items():
                    reps = max(3, args.repeats // 4) if name == "transformers BitLinear" else args.repeats
                    times[name] = time_fn(functools.partial(layer, x), warmup=3, repeats=reps)
            for name, t in times.items():
                bench.add(shape=f"{k}->{n}", tokens=tokens, impl=name, median_ms=t.median_ms, spread=t.spread,
                          ours_speedup=t.median_ms / times["bitdistill PackedBitLinear"].median_ms,
                          native_kernel=native_available(), threads=args.threads)
                print(bench.rows[-1]["shape"], tokens, name, f"{t.median_ms:.3f} ms", flush=True)
    note = ("`ours_speedup` = this row's median time / PackedBitLinear's median time in the same shape and token "
            "count (>1: ours is faster). Weight bytes resident: PackedBitLinear and transformers BitLinear "
            "hold in*out/4 bytes; nn.Linear bf16 holds in*out*2. Command: "
            f"`python benchmarks/bench_packed_cpu.py --threads {args.threads}`.")
    print(bench.write(["shape", "tokens", "impl", "median_ms", "spread", "ours_speedup", "threads"],
                      title="Packed ternary linear on CPU", note=note))


if __name__ == "__main__":
    main()
