"""``bitdistill generate MODEL --prompt TEXT``: greedy or sampled text from a teacher, student or packed folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bitdistill.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="packed folder, student folder, plain model folder or hub id, or the folder holding "
                                 "--gguf_file")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="text to continue (repeatable: one continuation per prompt, in order)")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=64,
                   help="tokens to generate per prompt, at most (default 64; fewer at an end-of-sequence token)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy (default); > 0: sample from softmax(logits / temperature)")
    p.add_argument("--top_p", "--top-p", type=float, default=1.0,
                   help="sample only from the most likely tokens holding this probability mass, in (0, 1] "
                        "(default 1: all)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of sampling (the same seed gives the same text; default: random)")
    p.add_argument("--decoder", choices=("auto", "fast", "torch"), default="auto",
                   help="auto: the fast decoder (static KV cache; native C for packed models on CPU) where it "
                        "applies, else the model's own forward (default); fast or torch: only that one")
    p.add_argument("--head", choices=("auto", "int8", "model"), default="auto",
                   help="the fast decoder's output head: auto: int8 on the native stack (faster; perplexity within "
                        "0.53%% on SmolLM2), the model's own elsewhere (default); int8; or model (exact)")
    p.add_argument("--gguf_file", "--gguf-file", default=None, help="GGUF file inside MODEL to load the model from")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: MODEL)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="torch device to run on (default cpu), e.g. cuda")


def run(args: argparse.Namespace) -> int:
    import torch

    from bitdistill.eval.generate import generate_text, validate_generation

    validate_generation(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, decoder=args.decoder, head=args.head)
    if args.seed is not None and args.seed < 0:
        raise UserError(f"--seed must be an integer >= 0, got {args.seed}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise UserError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from exc
    if (args.gguf_file is not None or Path(args.model).exists()) and not Path(args.model).is_dir():
        raise FileNotFoundError(f"MODEL {args.model} {'is not a folder' if Path(args.model).exists() else 'does not exist'}"
                                "; pass a model folder, a hub id, or the folder of a GGUF file with --gguf_file")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from bitdistill.eval.harness import load_for_eval

    model, tokenizer, _kind = load_for_eval(args.model, gguf_file=args.gguf_file, dtype=args.dtype,
                                            tokenizer=args.tokenizer)
    model.to(device)
    shown: set[str] = set()
    started = []

    def on_decoder(result) -> None:
        """Before each prompt's first token: the fallback line (once per reason, stderr), then the prompt."""
        if args.decoder == "auto" and result.reason and result.reason not in shown:
            shown.add(result.reason)
            print(f"bitdistill generate: {result.reason}; decoding through the model's own forward (torch path)",
                  file=sys.stderr, flush=True)
        print(("\n" if started else "") + result.prompt, end="", flush=True)
        started.append(result)

    generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, seed=args.seed, decoder=args.decoder, head=args.head, on_decoder=on_decoder,
                  on_text=lambda piece: print(piece, end="", flush=True))
    print(flush=True)
    return 0
