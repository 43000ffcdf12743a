"""Greedy decode speed on CPU, batch 1: bf16, packed, the fast in-torch path and llama.cpp, in one run.

Two models, each loaded in every implementation at once, then timed **interleaved** (one generation of
each implementation per round, ``--repeats`` rounds), so load from other processes hits all alike:

* ``SmolLM2-135M``: the SmolLM2-135M-Instruct student (post-training ternarization; speed only),
* ``llama-2048x8``: a randomly initialized Llama with 256-multiple rows (hidden 2048, 8 layers,
  intermediate 5632, 16 heads / 4 KV heads, SmolLM2's 49,152-token vocabulary, tied embeddings), where
  every projection is ternary in llama.cpp too.

Implementations: ``transformers bf16`` (the baseline), ``transformers packed`` (transformers' own
``BitLinear`` on the packed folder; fewer tokens, it is ~20x slower), ``load_packed`` (``generate``),
``load_packed fast`` (:class:`bitdistill.FastDecoder`, its default native backend: the whole decoder stack in
one C call per token), ``load_packed fast torch-ops`` (its ``torch`` backend: the model's own modules with a
static KV cache, bit-equal to ``generate``), ``load_packed fast int8 head`` (native, approximate head), ``llama.cpp (bitdistill GGUF)`` (llama-cpp-python on ``bitdistill pack
--format gguf`` of the same packed folder) and, for SmolLM2, ``llama.cpp TQ2_0 of teacher`` (llama.cpp's
own quantizer on the teacher, for reference). Each row: tokens/s (median over rounds), the spread
``(p80 - p20) / median``, ratios against transformers bf16 and llama.cpp on our GGUF in the same run,
the weights file size, the resident memory the implementation added when loaded, the load average.

Run from the repository root::

    python benchmarks/bench_decode_cpu.py --threads 2 --new-tokens 32 --repeats 5

Writes ``benchmarks/results/decode_cpu.{jsonl,md}``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, _quantile
from recorded import recorded_command
from smollm2 import DEFAULT_WORK, TOKENIZER, gguf_file, prepare, wiki_windows


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _hf_generate(model, prompt: torch.Tensor, n: int):
    def run():
        with torch.no_grad():
            return model.generate(prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n)[0, prompt.shape[1]:]
    return run


def _fast_generate(decoder, prompt: torch.Tensor, n: int):
    return lambda: decoder.generate(prompt, n)[0, prompt.shape[1]:]


def _llama_generate(llm, prompt: torch.Tensor, n: int):
    ids = prompt[0].tolist()

    def run():
        out = []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return torch.tensor(out)
    return run


def build_llama_2048(work: Path) -> dict[str, Path]:
    """The random 2048x8 Llama: a bf16 folder, its packed folder (bf16 floats) and the GGUF, built once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from bitdistill import replace_linear_with_bitlinear, save_packed
    from bitdistill.export.gguf import pack_gguf

    paths = {"bf16": work / "llama2048-bf16", "packed": work / "llama2048-packed", "gguf": work / "llama2048.gguf"}
    if not paths["packed"].is_dir():
        cfg = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                          tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        tok = AutoTokenizer.from_pretrained(TOKENIZER)
        model.save_pretrained(paths["bf16"])
        tok.save_pretrained(paths["bf16"])
        replace_linear_with_bitlinear(model)
        save_packed(model, paths["packed"], tokenizer=tok)
    if not paths["gguf"].is_file():
        print(pack_gguf(paths["packed"], paths["gguf"]).__str__().splitlines()[-1], flush=True)
    return paths


def smollm2_paths(work: Path) -> dict[str, Path]:
    """SmolLM2 folders (bf16, packed with bf16 floats), our GGUF of the packed folder, llama.cpp's TQ2_0."""
    import llama_cpp

    from bitdistill.export.gguf import pack_gguf

    paths = prepare(work)
    out = {"bf16": paths["bf16"], "packed": paths["packed-bf16"], "gguf": work / "smollm2-bitdistill.gguf",
           "teacher_tq2": work / "smollm2-teacher-llamacpp-tq2_0.gguf"}
    if not out["gguf"].is_file():
        print(pack_gguf(out["packed"], out["gguf"]).__str__().splitlines()[-1], flush=True)
    if not out["teacher_tq2"].is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_TQ2_0
        params.allow_requantize = True
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(gguf_file()).encode(), str(out["teacher_tq2"]).encode(),
                                            ctypes.byref(params))
        if rc != 0:
            raise SystemExit(f"llama.cpp quantize failed ({rc})")
    return out


def implementations(paths: dict[str, Path], prompt: torch.Tensor, n: int, n_slow: int, threads: int,
                    with_teacher: bool) -> list[tuple[str, Path, callable, int]]:
    """``(impl, weights file, generate(), new tokens)`` for each implementation, all loaded now."""
    import llama_cpp
    from transformers import AutoModelForCausalLM

    from bitdistill import FastDecoder, load_packed

    impls = []

    def add(name, path, make, tokens):
        gc.collect()
        before = _rss()
        fn = make()
        fn()  # warm-up (first-call compilation, page faults of mmapped weights)
        impls.append((name, path, fn, tokens, _rss() - before))

    add("transformers bf16", paths["bf16"], lambda: _hf_generate(
        AutoModelForCausalLM.from_pretrained(paths["bf16"], dtype=torch.bfloat16).eval(), prompt, n), n)
    add("transformers packed", paths["packed"], lambda: _hf_generate(
        AutoModelForCausalLM.from_pretrained(paths["packed"], dtype=torch.bfloat16).eval(), prompt, n_slow), n_slow)
    packed = {}

    def load():  # loaded inside add(): the load_packed row's resident memory is the packed model's
        packed["model"] = load_packed(paths["packed"])
        return _hf_generate(packed["model"], prompt, n)

    add("load_packed", paths["packed"], load, n)
    length = prompt.shape[1] + n
    add("load_packed fast", paths["packed"],
        lambda: _fast_generate(FastDecoder(packed["model"], length, backend="native"), prompt, n), n)
    add("load_packed fast torch-ops", paths["packed"],
        lambda: _fast_generate(FastDecoder(packed["model"], length, backend="torch"), prompt, n), n)
    add("load_packed fast int8 head", paths["packed"],
        lambda: _fast_generate(FastDecoder(packed["model"], length, int8_head=True, backend="native"), prompt, n), n)

    def llama(path):
        return llama_cpp.Llama(model_path=str(path), n_ctx=length + 8, n_threads=threads, n_batch=64, verbose=False)
    add("llama.cpp (bitdistill GGUF)", paths["gguf"], lambda: _llama_generate(llama(paths["gguf"]), prompt, n), n)
    if with_teacher:
        add("llama.cpp TQ2_0 of teacher", paths["teacher_tq2"],
            lambda: _llama_generate(llama(paths["teacher_tq2"]), prompt, n), n)
    return impls


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--slow-tokens", type=int, default=4, help="new tokens for transformers' packed BitLinear")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models", nargs="+", default=["SmolLM2-135M", "llama-2048x8"])
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    run_id = uuid.uuid4().hex[:12]
    command = recorded_command("benchmarks/bench_decode_cpu.py", sys.argv[1:])
    prompt = wiki_windows(1, args.prompt_tokens)
    bench = Bench("decode_cpu")
    agree = {}
    for model_name in args.models:
        smol = model_name == "SmolLM2-135M"
        paths = smollm2_paths(args.work) if smol else build_llama_2048(args.work)
        impls = implementations(paths, prompt, args.new_tokens, args.slow_tokens, args.threads, smol)
        samples = {name: [] for name, *_ in impls}
        outputs = {}
        loads = []
        for _ in range(args.repeats):
            loads.append(os.getloadavg()[0])
            for name, _, fn, tokens, _ in impls:
                t0 = time.perf_counter()
                outputs[name] = fn()
                samples[name].append(tokens / (time.perf_counter() - t0))
        rate = {name: statistics.median(s) for name, s in samples.items()}
        ref = outputs["load_packed"]
        agree[model_name] = {name: int((out[: len(ref)] == ref[: len(out)]).all()) for name, out in outputs.items()}
        for name, path, _, tokens, rss in impls:
            s = samples[name]
            bench.add(model=model_name, impl=name, threads=args.threads, new_tokens=tokens,
                      prompt_tokens=args.prompt_tokens, tokens_per_s=rate[name],
                      spread=(_quantile(s, 0.8) - _quantile(s, 0.2)) / rate[name],
                      vs_bf16=rate[name] / rate["transformers bf16"],
                      vs_llama_cpp=rate[name] / rate["llama.cpp (bitdistill GGUF)"],
                      same_tokens_as_load_packed=agree[model_name][name], file_mib=_size(path) / 2**20,
                      rss_added_mib=rss / 2**20, load_avg_1min=statistics.median(loads), repeats=args.repeats,
                      run=run_id, command=command)
            print(f"{model_name} {name}: {rate[name]:.1f} tok/s ({rate[name] / rate['transformers bf16']:.2f}x bf16, "
                  f"{rate[name] / rate['llama.cpp (bitdistill GGUF)']:.2f}x llama.cpp)", flush=True)
        del impls
        gc.collect()
    note = (f"Run `{run_id}`: greedy decoding, batch 1, {args.prompt_tokens}-token wiki.test.raw prompt, "
            f"{args.threads} threads, {args.repeats} interleaved rounds (one generation of every implementation per "
            "round); tokens_per_s is the median over rounds, spread = (p80 - p20) / median. vs_bf16 / vs_llama_cpp: "
            "ratio to transformers bf16 / to llama.cpp on bitdistill's GGUF of the same packed folder, in the same "
            "run. same_tokens_as_load_packed: 1 if the row's generated tokens equal load_packed's (over the shorter "
            "length; llama.cpp quantizes activations per 256-block, so its tokens may differ on an untrained model; "
            "the int8 head is approximate; the native fast path reduces in another order than torch, last-bit "
            "differences). file_mib: the weights file(s); rss_added_mib: resident memory the "
            "implementation added when loaded and warmed up (mmapped GGUF pages included once touched). "
            "load_avg_1min: the machine's median load during the rounds (2 cores shared with other jobs). "
            f"Command: `{command}`.")
    print(bench.write(["model", "impl", "new_tokens", "tokens_per_s", "spread", "vs_bf16", "vs_llama_cpp",
                       "same_tokens_as_load_packed", "file_mib", "rss_added_mib", "load_avg_1min"],
                      title="Decode speed on CPU: bf16, packed, fast in-torch path and llama.cpp", note=note))


if __name__ == "__main__":
    main()
