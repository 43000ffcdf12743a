"""Training loss of the two recipes of the recovery budget curve against CPU time, from a finished pair's folders.

Both recipes train on the same loss (the e2e recipe's flags; the staged recipe's e2e stage uses them too), so
their logged training losses (the mean of each 10 steps, ``audit_log.jsonl``) compare directly. A step's CPU time
is taken as the run's (or, for the staged recipe, its e2e stage's) recorded CPU time spread evenly over its logged
steps; the staged recipe's block stage logs no such loss. Prints a markdown table: the mean logged loss in each
tenth of the budget. From the repo root, after ``bench_recovery.py`` trained the pair into ``--work-dir``::

    python benchmarks/recovery_loss_curves.py --budget 90 --seed 1 --work-dir runs/recovery

(``--work-dir E2E_DIR STAGED_DIR`` when the two arms of the pair ran from their own folders.) ``--term logits``
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


def curves(e2e_work: Path, staged_work: Path, budget: float, seed: int,
           key: str = "loss") -> dict[str, list[tuple[float, float]]]:
    """The e2e and staged runs' ``(cpu_s, record[key])`` from their ``--work-dir`` folders and their recorded rows."""
    rows = {r["recipe"]: r for r in bench_recovery._rows() if r["budget_cpu_min"] == budget and r["seed"] == seed}
    missing = {"e2e", "staged"} - rows.keys()
    if missing:
        raise MissingRun(f"no recorded {' and '.join(sorted(missing))} row at {budget:g} CPU-min, seed {seed} in "
                         f"benchmarks/results/{bench_recovery.NAME}.jsonl; train the pair with bench_recovery.py first")
    stages = {s["stage"]: s for s in rows["staged"]["stages"]}
    logs = {"e2e": bench_recovery.run_folder(e2e_work, "e2e", budget, seed) / AUDIT_LOG_FILE,
            "staged": bench_recovery.run_folder(staged_work, "staged", budget, seed) / "e2e" / AUDIT_LOG_FILE}
    for f in logs.values():
        if not f.is_file():
            raise MissingRun(f"{f} not found; pass the --work-dir bench_recovery.py trained this pair in")
    return {"e2e": logged_losses(logs["e2e"], 0.0, rows["e2e"]["cpu_s"], key),
            "staged": logged_losses(logs["staged"], stages["blocks"]["cpu_s"], stages["e2e"]["cpu_s"], key)}


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
                   help="bench_recovery.py's --work-dir of the pair: one folder, or the e2e arm's then the staged arm's")
    p.add_argument("--term", choices=["logits", "attention", "hidden", "ce"],
                   help="one loss term (before its weight) instead of the weighted sum")
    a = p.parse_args()
    if len(a.work_dir) > 2:
        p.error("--work-dir takes one folder, or two (the e2e arm's, then the staged arm's)")
    key = f"loss_{a.term}" if a.term else "loss"
    try:
        print(table(curves(a.work_dir[0], a.work_dir[-1], a.budget, a.seed, key), a.budget, key=key))
    except MissingRun as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
