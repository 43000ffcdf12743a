"""Greedy decode speed on CPU, batch 1: SmolLM2-135M in bf16 vs the same model packed to 1.58 bits.

Same run, same prompt, same thread count:

* ``transformers bf16``: the plain bf16 model (the baseline users run today),
* ``transformers packed``: the packed folder loaded by plain ``AutoModelForCausalLM.from_pretrained``
  (transformers' own ``BitLinear``: it unpacks every weight on every call),
* ``bitdistill load_packed``: the same folder through :func:`bitdistill.load_packed` (``PackedBitLinear``,
  native kernel on the packed bytes), unconverted tensors in bf16 as stored, and upcast to float32.

Run from the repository root::

    python benchmarks/bench_decode_cpu.py --threads 2 1 --new-tokens 32

Writes ``benchmarks/results/decode_cpu.{jsonl,md}``. The weights are the untrained student (post-training
ternarization of SmolLM2), so only the speed is meaningful here, not the text.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench
from smollm2 import DEFAULT_WORK, prepare, wiki_windows


def tokens_per_second(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, torch.Tensor]:
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    with torch.no_grad():
        model.generate(prompt, do_sample=False, max_new_tokens=4, min_new_tokens=4)  # warm-up (and compile)
        rates, out = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(prompt, **kwargs)
            rates.append(new_tokens / (time.perf_counter() - t0))
    return sorted(rates)[len(rates) // 2], out


def main() -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from bitdistill import load_packed

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline-packed-tokens", type=int, default=8,
                   help="new tokens for transformers' packed BitLinear (it is ~20x slower)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    args = p.parse_args()
    paths = prepare(args.work)
    prompt = wiki_windows(1, args.prompt_tokens)
    bench = Bench("decode_cpu")
    runs = [
        ("transformers bf16", lambda: AutoModelForCausalLM.from_pretrained(paths["bf16"], dtype=torch.bfloat16),
         args.new_tokens),
        ("transformers packed (bf16)", lambda: AutoModelForCausalLM.from_pretrained(paths["packed-bf16"],
                                                                                    dtype=torch.bfloat16),
         args.baseline_packed_tokens),
        ("bitdistill load_packed (bf16)", lambda: load_packed(paths["packed-bf16"]), args.new_tokens),
        ("bitdistill load_packed (fp32 unconverted)", lambda: load_packed(paths["packed-bf16"], dtype=torch.float32),
         args.new_tokens),
    ]
    same = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        base = None
        outputs = {}
        for name, load, n in runs:
            model = load().eval()
            rate, out = tokens_per_second(model, prompt, n, args.repeats if n == args.new_tokens else 1)
            outputs[name] = out
            base = base or rate
            resident = sum(b.numel() * b.element_size() for b in model.state_dict().values())
            print(f"{threads} threads, {name}: {rate:.2f} tok/s ({rate / base:.2f}x bf16), "
                  f"state {resident / 2**20:.1f} MiB", flush=True)
            bench.add(model="SmolLM2-135M", impl=name, threads=threads, new_tokens=n,
                      prompt_tokens=args.prompt_tokens, tokens_per_s=rate, ratio_vs_bf16=rate / base,
                      state_mib=resident / 2**20, load_avg_1min=os.getloadavg()[0])
            del model
        same.append(torch.equal(outputs["bitdistill load_packed (bf16)"][:, : prompt.shape[1]
                                                                           + args.baseline_packed_tokens],
                                outputs["transformers packed (bf16)"]))
    note = (f"Greedy `generate`, batch 1, {args.prompt_tokens}-token prompt, median of "
            f"{args.repeats} runs. Same packed folder for both packed rows; first "
            f"{args.baseline_packed_tokens} generated tokens identical between transformers packed and "
            f"load_packed (bf16): {all(same)}. state_mib = bytes of the model's state dict as loaded (tied "
            f"embedding counted twice). load_avg_1min: the machine's load when the row was taken (2 cores, shared "
            f"with other jobs: a load above 2 slows every multi-threaded op). Command: "
            f"`python benchmarks/bench_decode_cpu.py --threads {' '.join(map(str, args.threads))} "
            f"--new-tokens {args.new_tokens}`.")
    print(bench.write(["impl", "threads", "new_tokens", "tokens_per_s", "ratio_vs_bf16", "state_mib", "load_avg_1min"],
                      title="Decode speed on CPU: SmolLM2-135M, bf16 vs 1.58-bit packed", note=note))


if __name__ == "__main__":
    main()
