"""How closely llama.cpp on bitdistill's GGUF reproduces the packed model, and what the int8 head costs.

For a trained student folder: pack it, export it with ``bitdistill pack --format gguf`` (TQ2_0, Q8_0
fallback for rows that are not a multiple of 256), then on wiki.test.raw (reporting only, never tuned on):

* greedy-token agreement: ``--prompts`` prompts of ``--prompt-tokens`` tokens, ``--new-tokens`` greedy tokens
  each from ``load_packed`` (:class:`bitdistill.FastDecoder`'s ``torch`` backend, equal to ``generate``), from
  llama.cpp (llama-cpp-python, default settings: float16 KV cache) and from the native fast path
  (``FastDecoder``'s default ``native`` backend); the share of tokens equal to ``load_packed``'s and the
  tokens generated before the first difference;
* perplexity on ``--windows`` non-overlapping ``--window`` token windows: ``load_packed``, llama.cpp,
  ``load_packed`` with the approximate int8 output head, and both fast-path backends fed one token at a time,
  as they decode (the torch backend shows how much the packed model's own incremental decode differs from
  its full forward: int8 activation codes flip where a reduction order changes the last float bit).

Run from the repository root::

    python benchmarks/bench_gguf_agreement.py --student /tmp/gguf_work/kd80/student

Writes ``benchmarks/results/gguf_agreement.{jsonl,md}``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench
from recorded import recorded_command
from smollm2 import wiki_windows


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum").item()


def main() -> None:
    import llama_cpp
    import numpy as np
    from transformers.utils import logging as hf_logging

    from bitdistill import FastDecoder, load_packed
    from bitdistill.cpu_ext import NativeInt8Head
    from bitdistill.export.folder import pack_pretrained
    from bitdistill.export.gguf import pack_gguf

    hf_logging.set_verbosity_error()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", type=Path, required=True, help="a trained student folder (bitdistill distill output)")
    p.add_argument("--name", default="SmolLM2-135M KD student")
    p.add_argument("--work", type=Path, default=Path("/tmp/bitdistill_gguf_agreement"))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    packed_dir, gguf_path = args.work / "packed", args.work / "student.gguf"
    if not packed_dir.is_dir():
        pack_pretrained(args.student, packed_dir)
    report = pack_gguf(packed_dir, gguf_path, overwrite=True)
    print(str(report).splitlines()[-1], flush=True)
    model = load_packed(packed_dir)
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=max(args.window, args.prompt_tokens + args.new_tokens) + 8,
                          n_threads=args.threads, n_batch=args.window, logits_all=True, verbose=False)

    prompts = wiki_windows(args.prompts * 4, args.prompt_tokens)[::4]  # spread over the text
    length = max(args.window, args.prompt_tokens + args.new_tokens)
    decoder = FastDecoder(model, length, backend="torch")
    native = FastDecoder(model, length, backend="native", int8_head=False)  # the model's own head
    equal, first_diff = {"llama.cpp": 0, "native fast path": 0}, {"llama.cpp": [], "native fast path": []}
    for prompt in prompts:
        ours = decoder.generate(prompt[None], args.new_tokens)[0, args.prompt_tokens:].tolist()
        theirs = {"llama.cpp": [], "native fast path": native.generate(prompt[None], args.new_tokens)[0, args.prompt_tokens:].tolist()}
        for token in llm.generate(prompt.tolist(), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            theirs["llama.cpp"].append(token)
            if len(theirs["llama.cpp"]) == args.new_tokens:
                break
        for name, tokens in theirs.items():
            equal[name] += sum(a == b for a, b in zip(ours, tokens, strict=True))
            first_diff[name].append(next((i for i, (a, b) in enumerate(zip(ours, tokens, strict=True)) if a != b),
                                         args.new_tokens))

    windows = wiki_windows(args.windows, args.window)
    nll = {"load_packed": 0.0, "llama.cpp": 0.0, "load_packed int8 head": 0.0, "native fast path": 0.0,
           "torch-ops fast path": 0.0}
    int8 = NativeInt8Head(model.lm_head.weight)
    with torch.no_grad():
        for w in windows:
            hidden = model.model(w[None]).last_hidden_state
            nll["load_packed"] += _nll_sum(model.lm_head(hidden)[0], w)
            nll["load_packed int8 head"] += _nll_sum(int8(hidden)[0], w)
            llm.reset()
            llm.eval(w.tolist())
            nll["llama.cpp"] += _nll_sum(torch.from_numpy(np.array(llm.scores[: args.window])), w)
            for name, fast in (("native fast path", native), ("torch-ops fast path", decoder)):
                nll[name] += _nll_sum(torch.cat([fast.step(w[None, i:i + 1], i) for i in range(len(w))]), w)
    count = args.windows * (args.window - 1)
    ppl = {k: math.exp(v / count) for k, v in nll.items()}

    bench = Bench("gguf_agreement")
    run_id = uuid.uuid4().hex[:12]
    total = args.prompts * args.new_tokens
    common = dict(model=args.name, run=run_id, gguf_type="tq2_0", ternary_share=report.ternary_share,
                  gguf_mib=report.file_bytes / 2**20, load_avg_1min=os.getloadavg()[0])
    for name in equal:
        bench.add(measure=f"greedy tokens equal ({name} vs load_packed)", value=equal[name] / total,
                  detail=f"{equal[name]}/{total} tokens; first difference after {sorted(first_diff[name])} tokens",
                  **common)
    for name, value in ppl.items():
        bench.add(measure=f"perplexity {name}", value=value,
                  detail=f"{args.windows}x{args.window} tokens; ratio to load_packed {value / ppl['load_packed']:.4f}",
                  **common)
    for row in bench.rows:
        print(row["measure"], f"{row['value']:.4g}", row["detail"])
    command = recorded_command("benchmarks/bench_gguf_agreement.py", sys.argv[1:])
    note = (f"Run `{run_id}`. Student: {args.name} (`{args.student.name}`), packed, then exported to GGUF "
            f"(TQ2_0; {report.ternary_share:.1%} of ternary weights stay ternary, the rest Q8_0 of the same ternary "
            "values). Greedy: prompts from wiki.test.raw, llama.cpp with its default float16 KV cache. Perplexity on "
            "the first non-overlapping windows of wiki.test.raw (reporting only). Command: `" + command + "` "
            "(student path as given).")
    print(bench.write(["model", "measure", "value", "detail", "ternary_share", "gguf_mib", "load_avg_1min"],
                      title="llama.cpp on bitdistill's GGUF vs load_packed: agreement and perplexity", note=note))


if __name__ == "__main__":
    main()
