"""Probe: the e2e recipe of the recovery budget curve with and without ``--quant_warmup_steps``.

Trains one student as ``bench_recovery.py``'s e2e recipe does (``bitdistill distill``'s defaults, stopped by a
budget of process CPU minutes, schedule fit to it), with ``--quant_warmup_steps N`` added when N > 0, and prints
one JSON line: steps, CPU seconds and the perplexity on the staged recipe's held-out blocks (the last 4 x 256
tokens of the training text; never wiki.test.raw). Run the arms to compare side by side, so they share the load.
Usage (from the repo root, with ``bench_recovery.py``'s requirements installed)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/probe_quant_warmup.py --budget 10 --warmup 60 --work-dir runs/qw60
"""
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_recovery


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, required=True, help="process CPU minutes of training")
    p.add_argument("--warmup", type=int, default=0, help="--quant_warmup_steps (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, required=True, help="the run's output folder (must not exist)")
    a = p.parse_args()
    extra = ("--quant_warmup_steps", str(a.warmup)) if a.warmup else ()
    info = bench_recovery.child_train("e2e", a.budget, a.work_dir, a.seed, extra)

    from bitdistill.eval import load_for_eval
    from bitdistill.recover.staged import held_out_loss

    model, tok, _ = load_for_eval(a.work_dir / "student", tokenizer=bench_recovery.TOKENIZER)
    held = math.exp(held_out_loss(model, bench_recovery.held_out_blocks(tok)))
    print(json.dumps({"budget_cpu_min": a.budget, "quant_warmup_steps": a.warmup, "seed": a.seed,
                      "steps": info["steps"], "cpu_s": info["cpu_s"], "wall_s": info["wall_s"],
                      "loadavg_start": info["loadavg_start"], "loadavg_end": info["loadavg_end"],
                      "held_out_ppl": held}))


if __name__ == "__main__":
    main()
