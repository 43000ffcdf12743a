"""Kernel benchmark: Triton BitLinear kernels vs the baselines a user would pick instead. One command, GPU.

    cd benchmarks && python bench_kernels.py [--out DIR] [--quick]

Measured in the same run, on projection shapes of Llama-3-8B, Qwen2.5-1.5B/7B and Phi-3-mini:

* device peaks: device-to-device copy bandwidth (bytes read + written) and a bf16 8192^3 matmul;
* decode (M = 1, 8 tokens): packed GEMV (``ops.packed_linear``) vs bf16 ``F.linear``, the reference packed
  path (unpack the whole weight every call, as transformers' packed BitLinear does) and ``torch.compile`` of it.
  Weights are rotated through more buffers than L2 holds, and every implementation is timed as CUDA-graph
  replays (decode is served with graphs; eager launch latency would otherwise dominate every column);
* prefill (M = 512, 4096): packed GEMM through the int8 path vs the same baselines;
* training forward+backward of BitLinear at 4096 tokens vs bf16 ``nn.Linear``, the reference fake-quant
  path (fake-quantized activations and weights with STE + bf16 matmul, what onebitllms/transformers run)
  and ``torch.compile`` of that path.

Rows go to ``<out>/bench_kernels.jsonl`` (appended) and ``<out>/bench_kernels.md`` (this run's tables).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, Bench, cuda_graph_time_ms, time_fn

from bitdistill import BitLinear, ops
from bitdistill.quant import packing, reference

# (model, projection, in_features K, out_features N)
SHAPES = [
    ("llama3-8b", "q/o_proj", 4096, 4096),
    ("llama3-8b", "k/v_proj", 4096, 1024),
    ("llama3-8b", "gate/up_proj", 4096, 14336),
    ("llama3-8b", "down_proj", 14336, 4096),
    ("qwen2.5-1.5b", "q/o_proj", 1536, 1536),
    ("qwen2.5-1.5b", "gate/up_proj", 1536, 8960),
    ("qwen2.5-1.5b", "down_proj", 8960, 1536),
    ("qwen2.5-7b", "q/o_proj", 3584, 3584),
    ("qwen2.5-7b", "gate/up_proj", 3584, 18944),
    ("qwen2.5-7b", "down_proj", 18944, 3584),
    ("phi3-mini", "qkv_proj", 3072, 9216),
    ("phi3-mini", "gate_up_proj", 3072, 16384),
    ("phi3-mini", "down_proj", 8192, 3072),
]
QUICK = {("llama3-8b", "q/o_proj"), ("llama3-8b", "gate/up_proj"), ("llama3-8b", "down_proj"),
         ("qwen2.5-1.5b", "q/o_proj")}
DEV = torch.device("cuda")
BF16 = torch.bfloat16
ROTATE_BYTES = 256 << 20  # > L2 (50-60 MB): weights are cycled through this many bytes of buffers


def device_peaks() -> dict:
    """Measured D2D copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s)."""
    n = 1 << 29  # 1 GiB of bf16 per buffer
    src = torch.randn(n // 2, device=DEV, dtype=BF16)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=3, repeats=20, device=DEV)
    copy_gbs = 2 * src.numel() * 2 / t.median_ms / 1e6
    a = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    b = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    t = time_fn(lambda: a @ b, warmup=5, repeats=30, device=DEV)
    return {"copy_GBps": copy_gbs, "bf16_TFLOPs": 2 * 8192**3 / t.median_ms / 1e9}


def graph_time(calls: list) -> float:
    """Median ms per call of ``calls`` (one per rotated input), replayed as one CUDA graph."""
    for c in calls:  # warm-up: compilation and autotuning happen here, outside the graph
        c()
    torch.cuda.synchronize()
    return cuda_graph_time_ms(calls)


def eager_time(calls: list) -> float:
    def run():
        for c in calls:
            c()
    for c in calls:
        c()
    return time_fn(run, warmup=2, repeats=10, device=DEV).median_ms / len(calls)


def _rotations(bytes_per_set: int) -> int:
    return max(2, min(64, math.ceil(ROTATE_BYTES / bytes_per_set)))


def inference_rows(bench: Bench, peaks: dict, model: str, proj: str, k: int, n: int, ms: list[int],
                   compiled_ref) -> None:
    torch.manual_seed(0)
    for m in ms:
        x = torch.randn(m, k, device=DEV, dtype=BF16)
        n_packed = _rotations(n * k // 4)
        n_bf16 = _rotations(n * k * 2)
        packs, scales = [], []
        for _ in range(n_packed):
            codes = torch.randint(-1, 2, (n, k), device=DEV, dtype=torch.int8)
            packs.append(packing.pack_ternary(codes))
            scales.append(torch.rand(1, device=DEV) + 0.5)
        weights = [torch.randn(n, k, device=DEV, dtype=BF16) * 0.02 for _ in range(n_bf16)]
        outs = {}
        outs["bf16 F.linear"] = graph_time([lambda w=w, x=x: F.linear(x, w) for w in weights])
        outs["triton packed"] = graph_time([lambda p=p, s=s, x=x: ops.packed_linear(x, p, s, None)
                                            for p, s in zip(packs, scales, strict=True)])
        few = list(zip(packs, scales, strict=True))[:2]
        outs["reference packed (unpack per call)"] = eager_time(
            [lambda p=p, s=s, x=x: packing.packed_linear_reference(x, p, s) for p, s in few])
        outs["torch.compile(reference packed)"] = eager_time([lambda p=p, s=s, x=x: compiled_ref(x, p, s)
                                                             for p, s in few])
        got = ops.packed_linear(x, packs[0], scales[0], None).float()
        want = packing.packed_linear_reference(x, packs[0], scales[0]).float()
        rel_err = ((got - want).norm() / want.norm()).item()
        base = outs["bf16 F.linear"]
        needed = {"bf16 F.linear": n * k * 2 + m * k * 2 + m * n * 2}
        packed_bytes = n * k // 4 + m * k * 2 + m * n * 2
        for impl, t in outs.items():
            nbytes = needed.get(impl, packed_bytes)
            gbs = nbytes / t / 1e6
            bench.add(section="inference", model=model, proj=proj, M=m, K=k, N=n, impl=impl, median_ms=t,
                      speedup_vs_bf16=base / t, GBps=gbs, pct_copy_bw=100 * gbs / peaks["copy_GBps"],
                      TFLOPs=2 * m * n * k / t / 1e9,
                      pct_bf16_peak=100 * 2 * m * n * k / t / 1e9 / peaks["bf16_TFLOPs"],
                      timing="cuda-graph" if impl in ("bf16 F.linear", "triton packed") else "eager",
                      **({"rel_err_vs_reference": rel_err} if impl == "triton packed" else {}))
        del packs, weights


def _fake_quant_linear(x, w, b):
    """The reference QAT path: STE fake-quant of activations and weights, then a bf16 matmul."""
    xq = x + (reference.fake_quant_activation(x) - x).detach()
    wq = w + (reference.fake_quant_weight(w) - w).detach()
    return F.linear(xq, wq, b)


def training_rows(bench: Bench, peaks: dict, model: str, proj: str, k: int, n: int, m: int,
                  compiled_fq) -> None:
    torch.manual_seed(0)
    x = torch.randn(m, k, device=DEV, dtype=BF16, requires_grad=True)
    gy = torch.randn(m, n, device=DEV, dtype=BF16)
    linear = torch.nn.Linear(k, n, bias=False, device=DEV, dtype=BF16)
    bit = BitLinear(k, n, bias=False, device=DEV, dtype=BF16)

    def step(fn, module):
        def run():
            module.weight.grad = None
            x.grad = None
            fn(x).backward(gy)
        return run

    def backward_with(gemm):
        run = step(bit, bit)

        def wrapped():
            os.environ["BITDISTILL_BACKWARD_GEMM"] = gemm
            try:
                run()
            finally:
                os.environ.pop("BITDISTILL_BACKWARD_GEMM")
        return wrapped

    impls = {
        "bf16 nn.Linear": step(linear, linear),
        "triton BitLinear": backward_with("cublas"),
        "triton BitLinear (triton backward GEMMs)": backward_with("triton"),
        "reference fake-quant + bf16 matmul": step(lambda t: _fake_quant_linear(t, bit.weight, None), bit),
        "torch.compile(reference fake-quant)": step(lambda t: compiled_fq(t, bit.weight, None), bit),
    }
    times = {name: time_fn(fn, warmup=3, repeats=15, device=DEV).median_ms for name, fn in impls.items()}
    flops = 6 * m * n * k
    parts = training_parts(bit, x.detach(), gy)
    for impl, t in times.items():
        bench.add(section="training", model=model, proj=proj, M=m, K=k, N=n, impl=impl, median_ms=t,
                  speedup_vs_bf16=times["bf16 nn.Linear"] / t, time_vs_bf16=t / times["bf16 nn.Linear"],
                  speedup_vs_fakequant=times["reference fake-quant + bf16 matmul"] / t,
                  TFLOPs=flops / t / 1e9, pct_bf16_peak=100 * flops / t / 1e9 / peaks["bf16_TFLOPs"],
                  **(parts if impl == "triton BitLinear" else {}))


def training_parts(bit: BitLinear, x: torch.Tensor, gy: torch.Tensor) -> dict:
    """Milliseconds of each piece of the Triton training step (to see where the time goes)."""
    from bitdistill.kernels import linear, quant

    w = bit.weight.detach()
    xc, xs = quant.activation_quant(x)
    wc, g = quant.weight_quant(w)
    t = lambda fn: time_fn(fn, warmup=3, repeats=15, device=DEV).median_ms  # noqa: E731
    return {
        "ms_act_quant": t(lambda: quant.activation_quant(x)),
        "ms_weight_quant": t(lambda: quant.weight_quant(w)),
        "ms_fwd_int8_gemm": t(lambda: linear.int8_ternary_linear(xc, xs, wc, g, None, x.dtype)),
        "ms_fwd_bf16_matmul": t(lambda: x @ w.t()),
        "ms_grad_x_cublas": t(lambda: linear.ternary_grad_input(gy, w, g, gemm="cublas")),
        "ms_grad_x_triton": t(lambda: linear.ternary_grad_input(gy, w, g, gemm="triton")),
        "ms_grad_w_cublas": t(lambda: linear.int8_grad_weight(gy, xc, xs, gemm="cublas")),
        "ms_grad_w_triton": t(lambda: linear.int8_grad_weight(gy, xc, xs, gemm="triton")),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="four shapes only")
    ap.add_argument("--skip", nargs="*", default=[], choices=["inference", "prefill", "training"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (the Triton kernels run only there)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    for limit in ("cache_size_limit", "recompile_limit"):  # one compiled baseline per shape
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    bench = Bench("bench_kernels", results_dir=args.out)
    peaks = device_peaks()
    print(json.dumps({"device": bench.env["device"], **peaks}), flush=True)
    bench.add(section="peaks", impl="device peaks", **peaks)
    compiled_ref = torch.compile(packing.packed_linear_reference)
    compiled_fq = torch.compile(_fake_quant_linear)
    shapes = [s for s in SHAPES if not args.quick or (s[0], s[1]) in QUICK]
    ms = ([1, 8] if "inference" not in args.skip else []) + ([512, 4096] if "prefill" not in args.skip else [])
    for model, proj, k, n in shapes:
        if ms:
            inference_rows(bench, peaks, model, proj, k, n, ms, compiled_ref)
        if "training" not in args.skip:
            training_rows(bench, peaks, model, proj, k, n, 4096, compiled_fq)
        write_markdown(bench, peaks)
        for row in bench.rows[-20:]:
            print({c: (round(v, 4) if isinstance(v, float) else v) for c, v in row.items()
                   if c in ("section", "model", "proj", "M", "impl", "median_ms", "speedup_vs_bf16", "pct_copy_bw")},
                  flush=True)
    write(bench, peaks)
    return 0


def write(bench: Bench, peaks: dict) -> None:
    """Append this run's rows to ``bench_kernels.jsonl`` and write ``bench_kernels.md``."""
    bench.results_dir.mkdir(parents=True, exist_ok=True)
    with (bench.results_dir / "bench_kernels.jsonl").open("a") as f:
        for row in bench.rows:
            f.write(json.dumps(row) + "\n")
    write_markdown(bench, peaks)


def write_markdown(bench: Bench, peaks: dict) -> None:
    """``bench_kernels.md``: the inference and training tables of this run (rewritten after every shape)."""
    bench.results_dir.mkdir(parents=True, exist_ok=True)
    all_rows = bench.rows
    inf = [r for r in all_rows if r.get("section") == "inference"]
    train = [r for r in all_rows if r.get("section") == "training"]
    note = (f"Measured peaks in this run: device-to-device copy **{peaks['copy_GBps']:.0f} GB/s** (read + write), "
            f"bf16 matmul 8192^3 **{peaks['bf16_TFLOPs']:.0f} TFLOP/s**. Times are medians; `speedup_vs_bf16` "
            "is bf16 `F.linear` / `nn.Linear` time over this row's time (higher is better). GB/s counts the bytes "
            "each implementation must move (packed weight for the packed rows, bf16 weight for F.linear, plus "
            "activations and outputs).")
    bench.rows = inf
    md = bench.markdown(["model", "proj", "M", "K", "N", "impl", "median_ms", "speedup_vs_bf16", "GBps",
                         "pct_copy_bw", "TFLOPs", "pct_bf16_peak", "timing", "rel_err_vs_reference"],
                        title="bench_kernels: packed inference (decode M=1, 8; prefill M=512, 4096)", note=note)
    bench.rows = train
    md += "\n" + bench.markdown(["model", "proj", "M", "K", "N", "impl", "median_ms", "time_vs_bf16",
                                 "speedup_vs_fakequant", "TFLOPs", "pct_bf16_peak", "ms_act_quant",
                                 "ms_weight_quant", "ms_fwd_int8_gemm", "ms_fwd_bf16_matmul", "ms_grad_x_cublas",
                                 "ms_grad_x_triton", "ms_grad_w_cublas", "ms_grad_w_triton"],
                                title="bench_kernels: BitLinear training step (forward + backward), 4096 tokens")
    bench.rows = all_rows
    (bench.results_dir / "bench_kernels.md").write_text(md)


if __name__ == "__main__":
    raise SystemExit(main())
