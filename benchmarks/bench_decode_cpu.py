"""Greedy decode speed on CPU: bitdistill's native stack against llama.cpp on the same ternary models, in one run.

Models (each loaded in every implementation at once, then timed **interleaved**: one call of each implementation
per round, ``--repeats`` rounds, so load from other processes hits all alike):

* ``SmolLM2-135M student``: a trained ``bitdistill recover`` student (``--student``, its final folder), packed
  (bf16 floats) and exported to GGUF here; beside it llama.cpp's own ``TQ2_0`` quantization of the teacher
  (llama.cpp's mix: ``Q4_0`` fallbacks, quantized head; other bytes, the fastest llama.cpp row here);
* ``llama-2048x8`` and ``llama-1536x8``: randomly initialized Llamas whose every row is a multiple of 256 (so the
  GGUF is all ``TQ2_0``), SmolLM2's 49,152-token vocabulary, tied embeddings.

Implementations: ``load_packed`` (transformers' ``generate`` on the packed model: the reference for tokens and
perplexity), ``fast`` (:class:`bitdistill.FastDecoder`, native stack, the model's bf16 head), ``fast int8 head``
(the native int8 head inside the stack), ``fast int8 head, batch 4`` (four prompts together), ``prefill GEMM`` /
``prefill token-by-token`` (a ``--prefill-tokens`` prompt through the native stack at once, or one token per
call), ``llama.cpp`` (llama-cpp-python, decoding the same tokens) and ``llama-bench`` (llama.cpp's own tool,
``tg`` of ``--new-tokens`` on ``--threads`` threads, built from the llama.cpp sources llama-cpp-python vendors:
``--llama-bench``), each on bitdistill's GGUF of the same packed folder.

Each row: tokens/s (median over rounds; batch rows count every sequence's tokens, prefill rows prompt tokens),
spread ``(p80 - p20) / median``, ratios against the faster llama.cpp row of the same GGUF (``vs_llama_cpp``) and
against the fastest llama.cpp row of the model (``vs_fastest_llama_cpp``), ``ternary_share`` (the fraction of
linear weights held ternary: the GGUF's for llama.cpp rows), ``bytes_per_token`` (weights, scales, norms and head
read for one new token; one embedding row; KV cache excluded), ``bandwidth_share`` (bytes_per_token x tokens/s over
a 2-thread copy benchmark measured beside the model's rounds, read + written bytes), ``bandwidth_share_paired`` (the median over rounds of
each call's tokens/s times bytes_per_token over a copy probed right before that call: the share with the
neighbours' load of that moment on both sides), ``bandwidth_share_run`` (the same as bandwidth_share over the best
copy of the whole run, paired probes included: the conservative figure), ``ppl`` (the same ``--ppl-windows`` x
``--ppl-length`` wiki.test.raw windows; llama-bench shares its GGUF's llama-cpp-python value), the load average.

Run from the repository root, on a quiet machine::

    python benchmarks/bench_decode_cpu.py --threads 2 --new-tokens 64 --repeats 3 \\
        --student RUN/  --llama-bench LLAMA_CPP_BUILD/bin/llama-bench

Writes ``benchmarks/results/decode_cpu.{jsonl,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, _quantile
from recorded import recorded_command
from smollm2 import DEFAULT_WORK, TOKENIZER, gguf_file, wiki_windows

SHAPES = {"llama-2048x8": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4),
          "llama-1536x8": dict(hidden_size=1536, intermediate_size=4096, num_attention_heads=12, num_key_value_heads=4)}
STUDENT = "SmolLM2-135M student"
PAIRED_COPIES = 3  # copies of the probe right before each timed call (bandwidth_share_paired)
LINEAR_NAMES = ("attn_q.", "attn_k.", "attn_v.", "attn_qkv.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.")


def build_random_llama(work: Path, name: str) -> dict[str, Path]:
    """A random Llama of ``SHAPES[name]`` (8 layers): its packed folder (bf16 floats) and GGUF, built once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from bitdistill import replace_linear_with_bitlinear, save_packed
    from bitdistill.export.gguf import pack_gguf

    stem = name.replace("llama-", "llama").split("x")[0]
    paths = {"packed": work / f"{stem}-packed", "gguf": work / f"{stem}.gguf"}
    if not paths["packed"].is_dir():
        cfg = LlamaConfig(vocab_size=49152, num_hidden_layers=8, max_position_embeddings=2048, tie_word_embeddings=True,
                          bos_token_id=1, eos_token_id=2, **SHAPES[name])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        replace_linear_with_bitlinear(model)
        save_packed(model, paths["packed"], tokenizer=AutoTokenizer.from_pretrained(TOKENIZER))
    if not paths["gguf"].is_file():
        print(str(pack_gguf(paths["packed"], paths["gguf"])).splitlines()[-1], flush=True)
    return paths


def student_paths(work: Path, student: Path) -> dict[str, Path]:
    """The student packed (bf16 floats), its GGUF, and llama.cpp's TQ2_0 of the teacher, built once."""
    import ctypes

    import llama_cpp

    from bitdistill.export.folder import pack_pretrained
    from bitdistill.export.gguf import pack_gguf

    out = {"packed": work / "student-packed", "gguf": work / "student.gguf",
           "teacher_tq2": work / "smollm2-teacher-llamacpp-tq2_0.gguf"}
    if not out["packed"].is_dir():
        print(pack_pretrained(student, out["packed"], dtype="bfloat16"), flush=True)
    if not out["gguf"].is_file():
        print(str(pack_gguf(out["packed"], out["gguf"])).splitlines()[-1], flush=True)
    if not out["teacher_tq2"].is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_TQ2_0
        params.allow_requantize = True
        params.nthread = 2
        if llama_cpp.llama_model_quantize(str(gguf_file()).encode(), str(out["teacher_tq2"]).encode(),
                                          ctypes.byref(params)):
            raise SystemExit("llama.cpp quantize failed")
    return out


def gguf_bytes(path: Path) -> tuple[int, float]:
    """(bytes read per token, ternary share of the linear weights) of a GGUF: every tensor but the token embedding,
    of which one row, unless it is also the (tied) output head."""
    from gguf import GGMLQuantizationType, GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    embd = tensors["token_embd.weight"]
    total = sum(int(t.n_bytes) for n, t in tensors.items() if n != "token_embd.weight")
    total += int(embd.n_bytes) // int(embd.shape[-1]) if "output.weight" in tensors else int(embd.n_bytes)
    linear = [t for n, t in tensors.items() if n.startswith("blk.") and any(s in n for s in LINEAR_NAMES)]
    ternary = {GGMLQuantizationType.TQ1_0, GGMLQuantizationType.TQ2_0}
    share = sum(int(t.n_elements) for t in linear if t.tensor_type in ternary) / sum(int(t.n_elements) for t in linear)
    return total, share


def packed_bytes(model, int8_head: bool) -> int:
    """Bytes the native stack reads per token of a packed model: every parameter and buffer of the decoder layers
    and final norm (packed codes, scales, norms), the head (bf16, or int8 codes plus a float scale a row), one
    embedding row."""
    inner = model.model
    layers = sum(t.numel() * t.element_size() for m in (inner.layers, inner.norm)
                 for t in [*m.parameters(), *m.buffers()])
    head = model.lm_head.weight
    head_bytes = head.shape[0] * (-(-head.shape[1] // 64) * 64 + 4) if int8_head else head.numel() * head.element_size()
    return layers + head_bytes + inner.embed_tokens.weight[0].numel() * inner.embed_tokens.weight.element_size()


class CopyProbe:
    """The machine's memory bandwidth as a 2-thread copy: read + written bytes per second of a ``mib`` MiB tensor
    copy, the best of ``repeats``. The buffers are allocated (and touched) once, so a probe between two timed
    calls costs only its copies."""

    def __init__(self, mib: int = 256) -> None:
        self.src = torch.ones(mib * 2**20 // 4)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)

    def __call__(self, repeats: int = 5) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.dst.copy_(self.src)
            best = min(best, time.perf_counter() - t0)
        return 2 * self.src.numel() * 4 / best


def paired_share(bytes_per_step: int, rates: list[float], copies: list[float], tokens_per_step: int = 1) -> float:
    """The median over rounds of ``bytes_per_step x steps/s`` over the copy bandwidth (bytes/s) probed right before
    each round's call: ``rates[i]`` tokens/s (every sequence's) paired with ``copies[i]``."""
    if len(rates) != len(copies) or not rates:
        raise ValueError(f"paired_share needs one copy per round, got {len(rates)} rates and {len(copies)} copies")
    return statistics.median(bytes_per_step * r / tokens_per_step / c for r, c in zip(rates, copies, strict=True))


def nll_ppl(logits_of, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) on ``windows [W, L]``, one window's logits ``[L, V]`` at a time from ``logits_of``
    (the logits of all windows at once would take gigabytes)."""
    nll = sum(float(torch.nn.functional.cross_entropy(logits_of(w)[:-1].float(), w[1:], reduction="sum"))
              for w in windows)
    return float(torch.tensor(nll / (windows.numel() - windows.shape[0])).exp())


def llama_ppl(path: Path, windows: torch.Tensor, threads: int) -> float:
    import llama_cpp
    import numpy as np

    length = windows.shape[1]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=length, n_batch=length, n_threads=threads, logits_all=True,
                          verbose=False)
    def logits_of(w: torch.Tensor) -> torch.Tensor:
        llm.reset()
        llm.eval(w.tolist())
        return torch.from_numpy(np.array(llm.scores[:length], dtype=np.float32))

    return nll_ppl(logits_of, windows)


def llama_bench_run(binary: Path, gguf: Path, n: int, threads: int) -> dict:
    """llama-bench's JSON row of generating ``n`` tokens (``tg``), one repetition (after its own warm-up)."""
    out = subprocess.run([str(binary), "-m", str(gguf), "-p", "0", "-n", str(n), "-t", str(threads), "-r", "1",
                          "-o", "json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]


def implementations(name: str, paths: dict[str, Path], prompt: torch.Tensor, args) -> list[dict]:
    """Every timed implementation of one model, loaded and warmed up: ``name, run(), tokens, bytes, share, ppl``."""
    import llama_cpp

    from bitdistill import FastDecoder, load_packed

    n, threads = args.new_tokens, args.threads
    windows = wiki_windows(args.ppl_windows, args.ppl_length)
    model = load_packed(paths["packed"])
    length = max(prompt.shape[1] + n, args.prefill_tokens + 1)
    impls = []

    def add(impl, run, tokens, nbytes, share, ppl, same_tokens=True):
        run()  # warm-up (page faults of mmapped weights, first-call work)
        impls.append(dict(impl=impl, run=run, tokens=tokens, bytes=nbytes, share=share, ppl=ppl,
                          same_tokens=same_tokens))
        print(f"{name} {impl}: loaded, ppl {ppl}", flush=True)

    from smollm2 import perplexity

    def hf_generate():
        with torch.no_grad():
            return model.generate(prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n)[0, prompt.shape[1]:]

    add("load_packed", hf_generate, n, packed_bytes(model, False), 1.0,
        perplexity(model, windows) if args.ppl_windows else None)
    for int8_head in (False, True):
        decoder = FastDecoder(model, length, int8_head=int8_head, backend="native")
        scorer = FastDecoder(model, args.ppl_length, int8_head=int8_head, backend="native")
        add("fast int8 head" if int8_head else "fast", lambda d=decoder: d.generate(prompt, n)[0, prompt.shape[1]:],
            n, packed_bytes(model, int8_head), 1.0,
            nll_ppl(lambda w, s=scorer: s.logits(w[None])[0], windows) if args.ppl_windows else None)
        del scorer
    batch = FastDecoder(model, length, int8_head=True, backend="native", max_batch=args.batch)
    prompts = wiki_windows(args.batch + 1, prompt.shape[1])[1:]
    add(f"fast int8 head, batch {args.batch}", lambda: batch.generate(prompts, n)[0, prompt.shape[1]:], args.batch * n,
        packed_bytes(model, True), 1.0, impls[-1]["ppl"], same_tokens=False)
    long = wiki_windows(1, args.prefill_tokens)

    def token_by_token():
        for i in range(long.shape[1]):
            logits = decoder.step(long[:, i:i + 1], i)
        return logits

    add(f"prefill {args.prefill_tokens} GEMM", lambda: decoder.step(long, 0), args.prefill_tokens,
        packed_bytes(model, True), 1.0, impls[-1]["ppl"], same_tokens=False)
    add(f"prefill {args.prefill_tokens} token-by-token", token_by_token, args.prefill_tokens,
        packed_bytes(model, True), 1.0, impls[-1]["ppl"], same_tokens=False)
    ggufs = [("", paths["gguf"])]
    if "teacher_tq2" in paths:
        ggufs.append((" TQ2_0 of teacher", paths["teacher_tq2"]))
    for label, path in ggufs:
        nbytes, share = gguf_bytes(path)
        ppl = llama_ppl(path, windows, threads) if args.ppl_windows else None
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=length + 8, n_threads=threads, n_batch=64, verbose=False)

        def llama_generate(llm=llm):
            out = []
            for token in llm.generate(prompt[0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                out.append(token)
                if len(out) == n:
                    break
            return torch.tensor(out)

        add(f"llama.cpp{label}", llama_generate, n, nbytes, share, ppl, same_tokens=not label)
        if args.llama_bench:
            add(f"llama-bench{label}", lambda p=path: llama_bench_run(args.llama_bench, p, n, threads)["avg_ts"], n,
                nbytes, share, ppl, same_tokens=False)
    return impls


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--ppl-windows", type=int, default=8, help="0: no perplexity")
    p.add_argument("--ppl-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="+", default=[STUDENT, *SHAPES])
    p.add_argument("--student", type=Path, help="a `bitdistill recover` output folder (its final student)")
    p.add_argument("--llama-bench", type=Path, help="llama-bench built from the llama.cpp llama-cpp-python vendors")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    args = p.parse_args()
    if STUDENT in args.models and args.student is None:
        p.error(f"--student is needed for the {STUDENT!r} model")
    torch.set_num_threads(args.threads)
    import llama_cpp

    from bitdistill.cpu_ext import cpu_isa

    run_id = uuid.uuid4().hex[:12]
    command = recorded_command("benchmarks/bench_decode_cpu.py", sys.argv[1:])
    prompt = wiki_windows(1, args.prompt_tokens)
    bench = Bench("decode_cpu")
    args.work.mkdir(parents=True, exist_ok=True)
    llama_version = f"llama-cpp-python {llama_cpp.__version__}"
    if args.llama_bench:
        first = args.work / "llama2048.gguf"
        info = llama_bench_run(args.llama_bench, first, 1, args.threads) if first.is_file() else {}
        llama_version += (f"; llama-bench build {info.get('build_number', '?')} commit "
                          f"{info.get('build_commit', '?')}, {info.get('cpu_info', '')}")
    run_copies, probe = [], CopyProbe()
    for model_name in args.models:
        paths = student_paths(args.work, args.student) if model_name == STUDENT else build_random_llama(args.work,
                                                                                                       model_name)
        impls = implementations(model_name, paths, prompt, args)
        samples = {i["impl"]: [] for i in impls}
        paired = {i["impl"]: [] for i in impls}  # the copy probed right before each of the impl's calls
        outputs, loads, copies = {}, [], [probe()]
        for _ in range(args.repeats):
            loads.append(os.getloadavg()[0])
            for impl in impls:
                paired[impl["impl"]].append(probe(PAIRED_COPIES))
                t0 = time.perf_counter()
                out = impl["run"]()
                dt = time.perf_counter() - t0
                if impl["impl"].startswith("llama-bench"):
                    samples[impl["impl"]].append(out)
                else:
                    outputs[impl["impl"]] = out
                    samples[impl["impl"]].append(impl["tokens"] / dt)
            copies.append(probe())
        loads.append(os.getloadavg()[0])
        bandwidth = max(copies)
        rate = {name: statistics.median(s) for name, s in samples.items()}
        ours_llama = max(rate[k] for k in ("llama.cpp", "llama-bench") if k in rate)
        fastest_llama = max(v for k, v in rate.items() if k.startswith("llama"))
        ref = outputs["load_packed"]
        for impl in impls:
            name = impl["impl"]
            same = ""
            if impl["same_tokens"] and name in outputs:
                out = outputs[name]
                same = int((out[: len(ref)] == ref[: len(out)]).all())
            s = samples[name]
            steps = args.batch if "batch" in name else 1  # tokens per step: one step reads the weights once
            best_llama = max(max(samples[k]) for k in ("llama.cpp", "llama-bench") if k in samples)
            bench.add(model=model_name, impl=name, threads=args.threads, new_tokens=args.new_tokens,
                      prompt_tokens=args.prompt_tokens, tokens_per_s=rate[name], tokens_per_s_best=max(s),
                      spread=(_quantile(s, 0.8) - _quantile(s, 0.2)) / rate[name],
                      vs_llama_cpp=rate[name] / ours_llama, vs_fastest_llama_cpp=rate[name] / fastest_llama,
                      best_vs_llama_cpp=max(s) / best_llama,
                      ternary_share=impl["share"], bytes_per_token=impl["bytes"],
                      bandwidth_share=(impl["bytes"] * rate[name] / steps / bandwidth if "prefill" not in name else ""),
                      bandwidth_share_paired=(paired_share(impl["bytes"], s, paired[name], steps)
                                              if "prefill" not in name else ""),
                      copy_gbps=bandwidth / 1e9, copy_gbps_paired=[round(c / 1e9, 2) for c in paired[name]], ppl=impl["ppl"], same_tokens_as_load_packed=same,
                      load_avg_1min=statistics.median(loads), load_avg_max=max(loads), repeats=args.repeats,
                      isa=cpu_isa(), llama_cpp=llama_version, run=run_id, command=command)
            print(f"{model_name} {name}: {rate[name]:.1f} tok/s ({rate[name] / ours_llama:.2f}x llama.cpp, "
                  f"{rate[name] / fastest_llama:.2f}x fastest llama.cpp), ppl {impl['ppl']}", flush=True)
        run_copies.extend(copies + [c for cs in paired.values() for c in cs])
        del impls
        gc.collect()
    run_bandwidth = max(run_copies)  # the machine's best copy of the whole run: the conservative share
    for row in bench.rows:
        row["copy_gbps_run"] = run_bandwidth / 1e9
        row["bandwidth_share_run"] = (row["bandwidth_share"] * row["copy_gbps"] * 1e9 / run_bandwidth
                                      if row["bandwidth_share"] != "" else "")
    note = (f"Run `{run_id}`: greedy decoding, {args.prompt_tokens}-token wiki.test.raw prompt, {args.new_tokens} new "
            f"tokens, {args.threads} threads, {args.repeats} interleaved rounds (one call of every implementation per "
            "round); tokens_per_s is the median over rounds (batch rows: all sequences' tokens; prefill rows: prompt "
            "tokens per second), spread = (p80 - p20) / median; tokens_per_s_best / best_vs_llama_cpp: the fastest round and its ratio to the faster llama.cpp row's fastest round (on a loaded machine the best round is closest to an unloaded one). vs_llama_cpp: against the faster of llama.cpp "
            "(llama-cpp-python) and llama-bench on bitdistill's GGUF of the same packed folder; vs_fastest_llama_cpp: "
            "against the fastest llama.cpp row of the model (for the student: llama.cpp's TQ2_0 of the teacher, other "
            "bytes). bytes_per_token: weights, scales, norms and head read for one new token, one embedding row, no "
            "KV cache; bandwidth_share = bytes_per_token x steps per second / copy_gbps (best 2-thread copy of 256 MiB "
            "measured before and after this model's rounds, read + written bytes; the machine's bandwidth varies "
            "with its neighbours' load, by up to 1.6x within one run here); bandwidth_share_paired: the median over "
            f"rounds of each call's share over a copy probed (best of {PAIRED_COPIES}) right before that call "
            "(copy_gbps_paired lists them), so both sides see the load of the same moment; bandwidth_share_run: "
            "bandwidth_share over the best copy of the whole run, probes included (copy_gbps_run), the conservative "
            "figure. ppl: the same 8 x 256-token windows (llama-bench: its GGUF's "
            "llama-cpp-python value). same_tokens_as_load_packed: 1 if the generated tokens equal load_packed's "
            "(llama.cpp quantizes activations per 256-block, the int8 head is approximate, the native stack reduces "
            f"in another order: last-bit differences). llama.cpp: {llama_version}; llama-bench built from the "
            "llama.cpp sources its sdist vendors. load_avg: the machine's 1-minute load during the rounds (2 cores). "
            f"Command: `{command}`.")
    print(bench.write(["model", "impl", "tokens_per_s", "spread", "vs_llama_cpp", "vs_fastest_llama_cpp",
                       "tokens_per_s_best", "best_vs_llama_cpp",
                       "ternary_share", "bytes_per_token", "bandwidth_share", "bandwidth_share_paired", "bandwidth_share_run", "ppl", "same_tokens_as_load_packed",
                       "load_avg_1min"],
                      title="Decode speed on CPU: bitdistill's native stack and llama.cpp", note=note))


if __name__ == "__main__":
    main()
