"""Probe: perplexity by position in a 512-token window, teacher vs. trained SmolLM2-135M students.

Text: the last ``--blocks`` x 512 tokens of wiki.valid.raw (the end of the recovery recipes' training text,
never wiki.test.raw). Prints one JSON line per model: perplexity over positions 0-63, 64-127, 128-255,
256-383 and 384-511 of the windows (each window predicts its last 511 tokens). Usage (from the repo root)::

    python benchmarks/probe_position_loss.py <student folder> [<student folder> ...]
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import SHARED, TOKENIZER, gguf_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from bitdistill.convert import load_model

SEQ = 512
BUCKETS = ((0, 64), (64, 128), (128, 256), (256, 384), (384, SEQ - 1))


@torch.no_grad()
def position_perplexity(model: torch.nn.Module, blocks: torch.Tensor) -> dict[str, float]:
    """Perplexity of ``model`` per position bucket over ``blocks [N, SEQ]``."""
    loss = torch.zeros(SEQ - 1)
    for row in blocks:
        logits = model(input_ids=row[None]).logits[0, :-1].float()
        loss += torch.nn.functional.cross_entropy(logits, row[1:], reduction="none")
    loss /= blocks.shape[0]
    return {f"{a}-{b - 1}": math.exp(loss[a:b].mean().item()) for a, b in BUCKETS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("students", nargs="*", help="student folders (bitdistill distill / recover output)")
    p.add_argument("--blocks", type=int, default=6)
    a = p.parse_args()
    torch.set_num_threads(2)
    text = (SHARED / "wikitext-2-raw-v1" / "wiki.valid.raw").read_text()[-200_000:]
    ids = AutoTokenizer.from_pretrained(TOKENIZER)(text, return_tensors="pt").input_ids[0]
    blocks = ids[-a.blocks * SEQ:].view(a.blocks, SEQ)
    g = gguf_file()
    teacher = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32).eval()
    print(json.dumps({"model": "teacher", **position_perplexity(teacher, blocks)}), flush=True)
    for folder in a.students:
        print(json.dumps({"model": Path(folder).name if Path(folder).name != "student" else Path(folder).parent.name,
                          **position_perplexity(load_model(folder).eval(), blocks)}), flush=True)


if __name__ == "__main__":
    main()
