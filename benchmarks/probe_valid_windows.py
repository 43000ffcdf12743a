"""Probe: held-out perplexity of the teacher and of students on wiki.valid.raw, in 512- and 128-token windows.

For probes whose students trained on ``wiki.train.prefix.raw`` only, so that ``wiki.valid.raw`` is held-out
text (never wiki.test.raw, which is for reporting). Scores the first ``--windows`` x 512 tokens of
wiki.valid.raw in non-overlapping 512-token windows and the same tokens in 128-token windows. Prints one JSON
line per model. Usage (from the repo root)::

    python benchmarks/probe_valid_windows.py [--windows 32] [--teacher] <student folder> [<student folder> ...]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import SHARED, TOKENIZER, gguf_file
from transformers import AutoTokenizer

from bitdistill.data import load_text, tokenize_text
from bitdistill.eval import load_for_eval, strided_perplexity

LONG, SHORT = 512, 128


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("students", nargs="*", help="student folders (bitdistill distill / recover output)")
    p.add_argument("--windows", type=int, default=32, help="512-token windows to score")
    p.add_argument("--teacher", action="store_true", help="score the teacher too")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ids = tokenize_text(load_text([SHARED / "wikitext-2-raw-v1" / "wiki.valid.raw"]),
                        AutoTokenizer.from_pretrained(TOKENIZER))[: a.windows * LONG]
    g = gguf_file()
    models = (["teacher"] if a.teacher else []) + a.students
    for name in models:
        if name == "teacher":
            model, _, _ = load_for_eval(g.parent, gguf_file=g.name, tokenizer=TOKENIZER)
        else:
            model, _, _ = load_for_eval(name, tokenizer=TOKENIZER)
        row = {"model": name, "tokens": int(ids.numel()),
               f"ppl{LONG}": strided_perplexity(model, ids, max_length=LONG).perplexity,
               f"ppl{SHORT}": strided_perplexity(model, ids, max_length=SHORT).perplexity}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
