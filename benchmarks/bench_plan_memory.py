"""``bitdistill plan``'s memory estimate against the peak of live tensor bytes of real distillation steps on CPU.

Each row builds a small student (BitLinear + SubLN) and a teacher of one config, takes one float32 AdamW step of
the logit-KL + CE loss (to create the optimizer state), then measures the next step's peak of live tensor bytes
(:class:`bitdistill.live_memory.LiveTensorBytes`: parameters, teacher, optimizer state, activations, gradients;
tensors, not RSS) and compares it with :func:`bitdistill.plan.estimate_memory` for that shape (one rank, float32
teacher and activations, AdamW). ``--set fit`` are the Llama shapes the constants ``K_*`` were fitted on (and the
least-squares refit of them); ``--set check`` are other shapes and architectures (Qwen2 with q/k/v biases and tied
embeddings, Phi-3 with fused qkv, Llama) that the fit never saw.

    python benchmarks/bench_plan_memory.py --set all
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench

from bitdistill.distill.losses import cross_entropy_loss, logits_distillation_loss, prediction_mask
from bitdistill.live_memory import LiveTensorBytes
from bitdistill.plan import Options, estimate_memory, model_shape


def config_for(arch: str, hidden: int, inter: int, layers: int, vocab: int, seq: int):
    from transformers import LlamaConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(seq, 64))
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "phi3":
        return Phi3Config(**{**common, "num_key_value_heads": 4}, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaConfig(**common)


def measure(config, micro_batch: int, seq: int, seed: int = 0) -> int:
    """Peak live tensor bytes of the second float32 distillation step (the first creates AdamW's state)."""
    from transformers import AutoModelForCausalLM

    from bitdistill.nn.replace import replace_linear_with_bitlinear
    from bitdistill.nn.subln import insert_subln

    torch.manual_seed(seed)
    teacher = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_config(config).train()
    replace_linear_with_bitlinear(student)
    insert_subln(student, init="ones")
    opt = torch.optim.AdamW(student.parameters())
    ids = torch.randint(3, config.vocab_size, (micro_batch, seq))

    def step() -> None:
        mask = prediction_mask(ids)
        n = float(mask.sum())
        with torch.no_grad():
            t = teacher(input_ids=ids).logits
        s = student(input_ids=ids).logits
        loss = logits_distillation_loss(s[:, :-1], t[:, :-1], mask, n) + cross_entropy_loss(s, ids, n)
        del s, t
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    with LiveTensorBytes([*student.parameters(), *teacher.parameters(), *state]) as live:
        live.reset_peak()
        step()
    return live.peak


def estimate(config, micro_batch: int, seq: int) -> float:
    opts = Options(gpus=1, teacher="float32", optimizer="adamw", micro_batch=micro_batch, seq_len=seq,
                   activation_dtype="float32")
    return estimate_memory(model_shape(config), opts).total


def shapes(which: str) -> list[tuple]:
    """``(arch, hidden, inter, layers, vocab, seq, micro_batch)`` rows of a set."""
    rng = random.Random(1 if which == "fit" else 7)
    out = []
    for _ in range(16 if which == "fit" else 10):
        h = rng.choice([32, 64, 96, 128, 192])
        row = (h, rng.choice([2, 3, 4]) * h, rng.choice([1, 2, 3, 4, 6]), rng.choice([256, 512, 1024, 2048, 4096, 8192]),
               rng.choice([16, 32, 64, 128, 256]), rng.choice([1, 2, 4]))
        arch = "llama" if which == "fit" else rng.choice(["qwen2", "phi3", "llama"])
        out.append((arch, *row))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=["fit", "check", "all"], default="all")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    bench = Bench("plan_memory")
    command = "python benchmarks/bench_plan_memory.py --set " + args.set
    sets = ["fit", "check"] if args.set == "all" else [args.set]
    for which, (arch, h, i, layers, v, s, b) in ((w, row) for w in sets for row in shapes(w)):
        cfg = config_for(arch, h, i, layers, v, s)
        t0 = time.process_time()
        peak = measure(cfg, b, s)
        est = estimate(cfg, b, s)
        bench.add(set=which, arch=arch, hidden=h, intermediate=i, layers=layers, vocab=v, seq=s, micro_batch=b,
                  measured_bytes=peak, estimated_bytes=est, error=(est - peak) / peak,
                  cpu_s=time.process_time() - t0, command=command, load_avg=_load())
        print(bench.rows[-1]["arch"], h, i, layers, v, s, b, f"error {bench.rows[-1]['error']:+.3f}", flush=True)
    worst = {w: max(abs(r["error"]) for r in bench.rows if r["set"] == w) for w in sets}
    bench.write(["set", "arch", "hidden", "intermediate", "layers", "vocab", "seq", "micro_batch", "measured_bytes",
                 "estimated_bytes", "error"], title="bitdistill plan: estimate against measured peak tensor bytes",
                note=f"`{command}`: largest |error| " + ", ".join(f"{w} {e:.3f}" for w, e in worst.items()) + ". Measured: peak live tensor bytes of one float32 "
                     "distillation step (LiveTensorBytes) on CPU; estimated: bitdistill.plan.estimate_memory.")


def _load() -> float:
    import os

    return os.getloadavg()[0]


if __name__ == "__main__":
    main()
