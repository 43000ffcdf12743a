"""Batch and prefill gains of the native decoder stack alone, on random models of the benchmark's shapes.

A development probe for issue 51's batch and prefill floors, where ``bench_decode_cpu.py`` (which times every
implementation, llama.cpp included) is too slow to run: the same ``NativeDecoderStack`` (int8 head), built from
random ternary weights of SmolLM2-135M's shapes (hidden 576, MLP 1536, 9 heads of 64, 3 kv heads, 30 layers,
vocabulary 49,152) or the benchmark's random Llamas, timed interleaved (one call of each case per round):

* ``batch 1`` / ``batch 4``: ``--steps`` decode steps of one or four sequences (positions 16 on);
* ``prefill GEMM`` / ``token-by-token``: a ``--prefill-tokens`` prompt in one call, or one token per call.

Each row: tokens per second of wall time and of process CPU time (medians over rounds; on a shared machine the
CPU-time rate is the steadier one at one thread), and the ratio the issue sets a floor on (batch 4 over batch 1,
prefill over token-by-token) from the same rounds. Run from the repository root::

    python benchmarks/probe_decode_batch.py --shape smollm2 --threads 2 --rounds 5

Appends to ``benchmarks/results/logs/decode_dev.jsonl`` (and writes ``decode_dev.md`` beside it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import RESULTS, Bench
from recorded import recorded_command

# hidden, intermediate, heads, kv heads, layers
SHAPES = {"smollm2": (576, 1536, 9, 3, 30), "llama-1536x8": (1536, 4096, 12, 4, 8),
          "llama-2048x8": (2048, 5632, 16, 4, 8)}


def random_stack(shape: str, max_length: int, max_batch: int):
    """A bfloat16 ``NativeDecoderStack`` of random ternary weights (scale 1.3) and an int8 head of ``shape``."""
    from bitdistill.cpu_ext import NativeDecoderStack, NativeInt8Head, NativeLayer, NativeLinear, NativeNorm
    from bitdistill.quant.packing import pack_ternary

    hidden, inter, heads, kv, layers = SHAPES[shape]
    d = hidden // heads
    torch.manual_seed(0)

    def lin(n: int, k: int) -> NativeLinear:
        return NativeLinear(pack_ternary(torch.randint(-1, 2, (n, k), dtype=torch.int8)), torch.tensor([1.3]))

    def norm(n: int) -> NativeNorm:
        return NativeNorm((1 + 0.1 * torch.randn(n)).to(torch.bfloat16), 1e-5)

    stack = [NativeLayer(input_norm=norm(hidden), post_norm=norm(hidden),
                         qkv=(lin(heads * d, hidden), lin(kv * d, hidden), lin(kv * d, hidden)),
                         o=lin(hidden, heads * d), mlp_in=(lin(inter, hidden), lin(inter, hidden)),
                         down=lin(hidden, inter)) for _ in range(layers)]
    angles = torch.arange(max_length)[:, None].float() / (10000 ** (torch.arange(0, d, 2).float() / d))[None]
    angles = torch.cat([angles, angles], -1)
    return NativeDecoderStack(stack, final_norm=norm(hidden), n_heads=heads, n_kv=kv, head_dim=d, scaling=d ** -0.5,
                              act="silu", cos=angles.cos().to(torch.bfloat16), sin=angles.sin().to(torch.bfloat16),
                              dtype=torch.bfloat16, head=NativeInt8Head(torch.randn(49152, hidden) * 0.05),
                              max_batch=max_batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from bitdistill.cpu_ext import cpu_isa

    n = args.prefill_tokens
    stack = random_stack(args.shape, n + 16, args.batch)
    hidden = SHAPES[args.shape][0]
    steps = torch.randn(args.batch, 1, hidden).to(torch.bfloat16)
    prompt = torch.randn(1, n, hidden).to(torch.bfloat16)
    stack.forward(torch.randn(args.batch, 16, hidden).to(torch.bfloat16), 0)

    def decode(b: int) -> int:
        for i in range(args.steps):
            stack.forward(steps[:b], 16 + i)
        return b * args.steps

    def prefill() -> int:
        stack.forward(prompt, 0)
        return n

    def token_by_token() -> int:
        for i in range(n):
            stack.forward(prompt[:, i:i + 1], i)
        return n

    cases = {"batch 1": lambda: decode(1), f"batch {args.batch}": lambda: decode(args.batch),
             f"prefill {n} GEMM": prefill, f"prefill {n} token-by-token": token_by_token}
    for fn in cases.values():
        fn()  # warm-up
    wall = {k: [] for k in cases}
    cpu = {k: [] for k in cases}
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for name, fn in cases.items():
            c0, t0 = time.process_time(), time.perf_counter()
            tokens = fn()
            wall[name].append(tokens / (time.perf_counter() - t0))
            cpu[name].append(tokens / (time.process_time() - c0))
    loads.append(os.getloadavg()[0])
    names = list(cases)
    base = {names[1]: names[0], names[2]: names[3]}
    bench = Bench("decode_dev", results_dir=RESULTS / "logs")
    command = recorded_command("benchmarks/probe_decode_batch.py", sys.argv[1:])
    for name in names:
        ref = base.get(name)
        ratio = [a / b for a, b in zip(wall[name], wall[ref], strict=True)] if ref else None
        ratio_cpu = [a / b for a, b in zip(cpu[name], cpu[ref], strict=True)] if ref else None
        bench.add(shape=args.shape, case=name, threads=args.threads, tokens_per_s=statistics.median(wall[name]),
                  tokens_per_cpu_s=statistics.median(cpu[name]),
                  ratio=statistics.median(ratio) if ratio else "", ratio_cpu=statistics.median(ratio_cpu) if ratio else "",
                  ratio_rounds=[round(r, 2) for r in ratio] if ratio else "", rounds=args.rounds,
                  load_avg_1min=statistics.median(loads), load_avg_max=max(loads), isa=cpu_isa(), command=command)
        print(f"{args.shape} {name}: {statistics.median(wall[name]):.1f} tok/s, "
              f"{statistics.median(cpu[name]):.1f} tok/CPU-s" + (f", x{statistics.median(ratio):.2f} "
                                                                 f"(CPU x{statistics.median(ratio_cpu):.2f})" if ratio else ""),
              flush=True)
    print(bench.write(["shape", "case", "threads", "tokens_per_s", "tokens_per_cpu_s", "ratio", "ratio_cpu",
                       "load_avg_1min"], title="Native decoder: batch and prefill gains (development probe)",
                      note=f"Command: `{command}`. ratio: batch 4 over batch 1, prefill GEMM over token-by-token, "
                           "median of the per-round ratios (wall time); ratio_cpu: the same in process CPU time."))


if __name__ == "__main__":
    main()
