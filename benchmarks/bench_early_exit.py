"""Early-exit quality/speed trade-off of a model trained with ``bitdistill self-distill``.

For each confidence threshold:

- quality: teacher-forced perplexity on wiki.test.raw when every token is predicted by the exit early-exit
  decoding would take (:func:`bitdistill.early_exit_perplexity`) and the mean fraction of blocks run;
- speed: greedy ``early_exit_generate`` from prompts cut from wiki.test.raw: generated tokens per second,
  mean fraction of blocks run, and agreement of its tokens with full-depth greedy decoding (threshold > 1)
  at the same positions (teacher-forced on the full-depth sequence, so one early difference does not count
  against every later token).

Usage (from the repo root)::

    python benchmarks/bench_early_exit.py MODEL_DIR [MODEL_DIR ...] --thresholds 0.5 0.7 0.9 0.99 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorded import shown_path

REPO = Path(__file__).resolve().parents[1]
WIKI = REPO.parent / "shared" / "data" / "wikitext-2-raw-v1"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="folders written by `bitdistill self-distill` (<output_dir>/model)")
    p.add_argument("--labels", nargs="*", default=None, help="a name per model for the table")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9, 0.99, 2.0])
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="early_exit")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from harness import Bench
    from transformers import AutoTokenizer

    from bitdistill import early_exit_generate, early_exit_logits, early_exit_perplexity, load_multi_exit
    from bitdistill.data import load_text, tokenize_text

    labels = a.labels or [Path(m).parent.name for m in a.models]
    # recorded relative to the models' common folder, never as this machine's paths
    common = Path(os.path.commonpath([Path(m).absolute().parent for m in a.models]))
    shown = {m: shown_path(str(Path(m).absolute()), {common: "<models>"}) for m in a.models}
    bench = Bench(a.name)
    for label, folder in zip(labels, a.models, strict=True):
        mx = load_multi_exit(folder)
        ids = tokenize_text(load_text([WIKI / "wiki.test.raw"]), AutoTokenizer.from_pretrained(folder))
        prompts = [ids[i * 1000: i * 1000 + a.prompt_tokens][None] for i in range(a.prompts)]
        reference = [early_exit_generate(mx, q, max_new_tokens=a.new_tokens, threshold=2.0).sequences for q in prompts]
        for threshold in a.thresholds:
            ppl, depth = early_exit_perplexity(mx, ids, threshold=threshold, max_length=a.window,
                                               max_windows=a.eval_windows)
            agree, total, depths, seconds, tokens = 0, 0, [], 0.0, 0
            for q, ref in zip(prompts, reference, strict=True):
                t = time.perf_counter()
                gen = early_exit_generate(mx, q, max_new_tokens=a.new_tokens, threshold=threshold)
                seconds += time.perf_counter() - t
                tokens += len(gen.exit_blocks)
                depths.append(gen.mean_depth_fraction)
                with torch.no_grad():
                    chosen, _ = early_exit_logits(mx(ref).logits, threshold)
                predicted = chosen[0, q.shape[1] - 1: -1].argmax(-1)
                agree += int((predicted == ref[0, q.shape[1]:]).sum())
                total += predicted.numel()
            bench.add(model=label, threshold=threshold, perplexity=ppl.perplexity, eval_depth=depth,
                      gen_depth=sum(depths) / len(depths), tokens_per_s=tokens / seconds,
                      agreement_with_full=agree / total, eval_tokens=ppl.num_tokens, threads=a.threads,
                      cpu_count=os.cpu_count(), model_dir=shown[folder])
            print(bench.rows[-1], flush=True)
    note = (f"perplexity/eval_depth: teacher-forced on the first {a.eval_windows} non-overlapping {a.window}-token "
            f"windows of wiki.test.raw, each token predicted by the first exit whose top probability reaches the "
            f"threshold (threshold 2 = always the deepest exit). tokens_per_s/gen_depth: greedy early-exit decoding "
            f"(no KV cache; {a.prompts} prompts of {a.prompt_tokens} tokens, {a.new_tokens} new tokens, "
            f"{a.threads} threads); agreement_with_full: fraction of positions where the early-exit prediction equals "
            f"full-depth greedy decoding's token. Reproduce: `python benchmarks/bench_early_exit.py "
            f"{' '.join(shown.values())} --labels {' '.join(labels)} --thresholds {' '.join(map(str, a.thresholds))}`.")
    md = bench.write(["model", "threshold", "perplexity", "eval_depth", "gen_depth", "tokens_per_s",
                      "agreement_with_full"], title="Early-exit decoding: quality vs speed (CPU)", note=note)
    print(md.read_text())


if __name__ == "__main__":
    main()
