"""Training loss of the two recipes of the recovery budget curve against CPU time, from a finished pair's folders.

Both recipes train on the same loss (the e2e recipe's flags; the staged recipe's e2e stage uses them too), so
their logged training losses (the mean of each 10 steps, ``audit_log.jsonl``) compare directly. A step's CPU time
is taken as the run's (or, for the staged recipe, its e2e stage's) recorded CPU time spread evenly over its logged
steps; the staged recipe's block stage logs no such loss. Prints a markdown table: the mean logged loss in each
tenth of the budget. From the repo root, after ``bench_recovery.py`` trained the pair into ``--work-dir``::

    python benchmarks/recovery_loss_curves.py --budget 90 --seed 1 --work-dir runs/recovery

(``--work-dir E2E_DIR STAGED_DIR`` when the two arms of the pair ran from their own folders; any number of folders,
e.g. two staged arms of a probe, with ``--rows benchmarks/results/logs/<probe>.jsonl`` where an e2e arm's row is
not in the budget curve's jsonl.) ``--term logits``
(or ``attention``, ``hidden``, ``ce``) tabulates one loss term, before its weight, instead of the weighted sum: the
audit log records each term as ``loss_<term>`` in runs from 2026-12-04 on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_recovery

from bitdistill.audit import AUDIT_LOG_FILE
from bitdistill.distill.losses import LOSS_TERMS


class MissingRun(Exception):
    """The pair's recorded rows or training folders are not where the arguments say."""


def logged_losses(audit_log: Path, start_cpu_s: float, end_cpu_s: float, key: str = "loss") -> list[tuple[float, float]]:
    """``(cpu_s, record[key])`` for every training log line of a run whose logged steps span
    ``[start_cpu_s, end_cpu_s]`` (the last log line is put at ``end_cpu_s``: the few steps after it, under 10 of
    about 1,000, are ignored). ``key`` is ``"loss"`` (the weighted sum) or one term's ``"loss_<term>"``; a log whose
    training records lack it raises ``MissingRun``."""
    lines = [json.loads(x) for x in audit_log.read_text().splitlines() if x.strip()]
    train = [x for x in lines if x.get("event") == "train" and "loss" in x]
    if any(key not in x for x in train):
        raise MissingRun(f"{audit_log} has training records without {key!r} (a term its run did not train, or a run "
                         "from before 2026-12-04, whose audit log kept only the summed loss)")
    steps = max((x["step"] for x in train), default=0)
    return [(start_cpu_s + x["step"] / steps * (end_cpu_s - start_cpu_s), x[key]) for x in train]


def _e2e_cpu_s(rows_file: Path, budget: float, seed: int) -> float:
    """The recorded CPU time of the one e2e row at ``(budget, seed)`` in ``rows_file`` (the e2e run's folder does
    not record it; the staged run's ``recovery.json`` does)."""
    rows = [r for r in bench_recovery.read_rows(rows_file) if r["recipe"] == "e2e" and r["budget_cpu_min"] == budget
            and r["seed"] == seed]
    if len(rows) != 1:
        raise MissingRun(f"{len(rows) or 'no'} recorded e2e rows at {budget:g} CPU-min, seed {seed} in {rows_file}; "
                         "train the run with bench_recovery.py first, or pass the --rows file it was recorded in")
    return rows[0]["cpu_s"]


def curves(work_dirs: list[Path], budget: float, seed: int, key: str = "loss",
           rows_file: Path = bench_recovery.RESULTS / f"{bench_recovery.NAME}.jsonl") -> dict[str, list[tuple[float, float]]]:
    """``(cpu_s, record[key])`` of every e2e and staged run at ``(budget, seed)`` under the ``--work-dir`` folders,
    in their order (e2e before staged within one), labelled by recipe, or by ``recipe (folder name)`` when a recipe
    is under more than one. A staged run's e2e stage spans its ``recovery.json``'s CPU time from the stage before
    it to its end; an e2e run spans its row's CPU time in ``rows_file``."""
    arms = [(recipe, work) for work in work_dirs for recipe in ("e2e", "staged")
            if bench_recovery.run_folder(work, recipe, budget, seed).is_dir()]
    if not arms:
        raise MissingRun(f"no e2e or staged run at {budget:g} CPU-min, seed {seed} under "
                         f"{', '.join(map(str, work_dirs))}; pass the --work-dir bench_recovery.py trained in")
    repeated = {recipe for recipe, _ in arms if sum(r == recipe for r, _ in arms) > 1}
    out = {}
    for recipe, work in arms:
        folder = bench_recovery.run_folder(work, recipe, budget, seed)
        if recipe == "e2e":
            log, start, end = folder / AUDIT_LOG_FILE, 0.0, _e2e_cpu_s(rows_file, budget, seed)
        else:
            summary = folder / "recovery.json"
            if not summary.is_file():
                raise MissingRun(f"{summary} not found: the staged run did not finish")
            stages = json.loads(summary.read_text())["stages"]
            i = [s["stage"] for s in stages].index("e2e")
            log, start, end = folder / "e2e" / AUDIT_LOG_FILE, stages[i - 1]["cpu_s"], stages[i]["cpu_s"]
        if not log.is_file():
            raise MissingRun(f"{log} not found; pass the --work-dir bench_recovery.py trained this run in")
        out[f"{recipe} ({work.name})" if recipe in repeated else recipe] = logged_losses(log, start, end, key)
    return out


def table(curves_: dict[str, list[tuple[float, float]]], budget: float, parts: int = 10, key: str = "loss") -> str:
    """Markdown: the mean logged ``key`` of each run (a column per key of ``curves_``, in order) in each ``1/parts``
    of the budget (the last part includes its end and anything logged past it; empty where none was logged)."""
    out = ["| CPU-min | " + " | ".join(f"{label} {key}" for label in curves_) + " |",
           "|---|" + "---|" * len(curves_)]
    width = budget * 60 / parts
    for i in range(parts):
        cells = []
        for points in curves_.values():
            xs = [loss for t, loss in points if min(int(t // width), parts - 1) == i]
            cells.append(f"{sum(xs) / len(xs):.2f}" if xs else "")
        out.append(f"| {i * width / 60:.0f}-{(i + 1) * width / 60:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, required=True, help="the pair's budget, CPU-minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, nargs="+", required=True,
                   help="bench_recovery.py's --work-dir folders: a column for each e2e and staged run in them")
    p.add_argument("--rows", type=Path, default=bench_recovery.RESULTS / f"{bench_recovery.NAME}.jsonl",
                   help="the jsonl that holds the e2e run's row (its CPU time; default: the budget curve's)")
    p.add_argument("--term", choices=LOSS_TERMS, help="one loss term (before its weight) instead of the weighted sum")
    a = p.parse_args()
    key = f"loss_{a.term}" if a.term else "loss"
    try:
        print(table(curves(a.work_dir, a.budget, a.seed, key, a.rows), a.budget, key=key))
    except MissingRun as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
