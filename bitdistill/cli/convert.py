"""``bitdistill convert SRC OUT``: a pretrained model -> a BitNet student folder (latent weights)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="model folder, hub id, or tiny:<arch> (llama, qwen2, qwen3, phi3, mistral, gpt_neox, gpt2)")
    p.add_argument("out", help="output folder for the student")
    p.add_argument("--gguf_file", "--gguf-file", default=None, help="GGUF file name inside SRC to load the model from")
    p.add_argument("--skip", action="append", default=None, metavar="PATTERN",
                   help="module pattern to keep full precision (repeatable; default: lm_head)")
    p.add_argument("--use_rms_norm", "--use-rms-norm", action="store_true", help="add an in-layer RMSNorm before activation quantization")
    p.add_argument("--weight_scale", "--weight-scale", default="tensor",
                   help="ternary weight scales: tensor (one per weight, BitNet b1.58) or row (one per output row)")
    p.add_argument("--dtype", default="float32", help="dtype to load and save in (float32, bfloat16, float16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from bitdistill.convert import convert_pretrained

    report = convert_pretrained(args.src, args.out, modules_to_not_convert=args.skip or ("lm_head",),
                                use_rms_norm=args.use_rms_norm, gguf_file=args.gguf_file, dtype=args.dtype,
                                overwrite=args.overwrite, weight_scale=args.weight_scale)
    print(report)
    print(f"wrote BitNet student to {args.out}")
    return 0
