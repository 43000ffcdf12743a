"""``bitdistill unpack SRC OUT``: packed folder -> float32 BitNet student folder, for further training."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="packed folder written by bitdistill pack")
    p.add_argument("out", help="output student folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from bitdistill.export.folder import unpack_pretrained

    layers = unpack_pretrained(args.src, args.out, overwrite=args.overwrite)
    print(f"unpacked {len(layers)} packed layers into BitLinear; wrote student to {args.out}")
    return 0
