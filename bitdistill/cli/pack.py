"""``bitdistill pack SRC OUT``: a BitNet student -> 1.58-bit packed safetensors (HF ``bitnet`` format)."""

from __future__ import annotations

import argparse
import sys
import warnings

from bitdistill.errors import UserError


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="student folder written by bitdistill convert/distill (or any model folder with "
                               "--from_plain)")
    p.add_argument("out", help="output folder (written atomically), or OUT.gguf with --format gguf")
    p.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors",
                   help="safetensors: packed HF bitnet folder (default); gguf: one GGUF file for llama.cpp "
                        "(SRC may also be a packed folder)")
    p.add_argument("--gguf_type", "--gguf-type", choices=("tq2_0", "tq1_0"), default="tq2_0",
                   help="llama.cpp ternary type for --format gguf (default tq2_0)")
    p.add_argument("--strict", action="store_true",
                   help="--format gguf: refuse layers llama.cpp cannot hold as ternary (rows not a multiple of "
                        "256) instead of writing them as Q8_0")
    p.add_argument("--from_plain", "--from-plain", action="store_true",
                   help="SRC is a plain model: ternarize it post-training (quality needs distillation)")
    p.add_argument("--gguf_file", "--gguf-file", default=None,
                   help="GGUF file inside SRC to read the model from (implies --from_plain)")
    p.add_argument("--skip", action="append", default=None, metavar="PATTERN",
                   help="module pattern kept in floating point, plain sources only (repeatable; default lm_head)")
    p.add_argument("--dtype", default="auto", help="dtype of the unconverted tensors (embeddings, head, norms): auto "
                                                   "(bfloat16; float16 for a float16 source), bfloat16, float16, or "
                                                   "float32 (the float32 student's exact function)")
    p.add_argument("--max_shard_size", "--max-shard-size", default="5GB", type=_size,
                   help="start a new safetensors shard past this size (e.g. 500MB, 2GB; default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from bitdistill.export.folder import PTQ_WARNING, pack_pretrained

    if args.format == "gguf":
        return _run_gguf(args, PTQ_WARNING)
    if args.gguf_type != "tq2_0" or args.strict:
        raise UserError("--gguf_type and --strict apply to --format gguf only")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pack_pretrained(args.src, args.out, from_plain=args.from_plain, gguf_file=args.gguf_file,
                                 skip=args.skip, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                                 overwrite=args.overwrite)
    if any(str(w.message) == PTQ_WARNING for w in caught):
        print(f"WARNING: {PTQ_WARNING}", file=sys.stderr)
    print(result)
    print(f"wrote packed model to {args.out} ({', '.join(result.report.files)})")
    return 0


def _run_gguf(args: argparse.Namespace, ptq_warning: str) -> int:
    from bitdistill.export.gguf import pack_gguf

    if args.max_shard_size != _size("5GB"):
        raise UserError("--max_shard_size applies to safetensors output; a GGUF is one file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = pack_gguf(args.src, args.out, gguf_type=args.gguf_type, strict=args.strict,
                           from_plain=args.from_plain, gguf_file=args.gguf_file, skip=args.skip, dtype=args.dtype,
                           overwrite=args.overwrite)
    if any(str(w.message) == ptq_warning for w in caught):
        print(f"WARNING: {ptq_warning}", file=sys.stderr)
    print(report)
    return 0
