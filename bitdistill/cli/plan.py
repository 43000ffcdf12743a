"""``bitdistill plan TEACHER --gpus N --gpu_memory_gb M``: per-rank memory and the options that fit.

Exit status 0 with a recommendation; 2 (one line on stderr naming the part that does not fit and by how much) when
no option set fits.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("teacher", help="teacher model folder, its config.json, or a hub id (online); only the config is read")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (ranks)")
    p.add_argument("--gpu_memory_gb", type=float, required=True, help="memory of each GPU in GB (1e9 bytes), e.g. 24 or 80")
    p.add_argument("--max_seq_length", type=int, default=2048, help="tokens per training sequence")
    p.add_argument("--micro_batch", type=int, default=8, help="sequences per rank and micro-step "
                   "(--per_device_train_batch_size)")
    p.add_argument("--teacher_dtype", default="float32", help="float32 (what distill loads by default), bfloat16, int8, "
                   "or cache (teacher-logit cache)")
    p.add_argument("--optimizer", default="adamw", help="adamw or adamw_8bit")
    p.add_argument("--activation_checkpointing", action="store_true", help="plan with activation (gradient) "
                   "checkpointing")
    p.add_argument("--fsdp", action="store_true", help="plan with FSDP from the start (needs --gpus 2 or more)")
    p.add_argument("--activation_dtype", default="bfloat16", help="bfloat16 (--bf16) or float32")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from bitdistill.plan import plan

    result = plan(args.teacher, gpus=args.gpus, gpu_gb=args.gpu_memory_gb, seq_len=args.max_seq_length,
                  micro_batch=args.micro_batch, teacher_dtype=args.teacher_dtype, optimizer=args.optimizer,
                  gradient_checkpointing=args.activation_checkpointing, fsdp=args.fsdp,
                  activation_dtype=args.activation_dtype)
    print(result.to_json() if args.json else result.render())
    if not result.fits:
        print(f"bitdistill plan: {result.shortfall()}", file=sys.stderr)
        return 2
    return 0
