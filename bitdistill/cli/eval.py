"""``bitdistill eval MODEL --tasks ...``: lm-evaluation-harness tasks on a teacher, student or packed folder."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="model folder, hub id, or the folder holding --gguf_file")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval task names, e.g. wikitext_lastword or "
                                                 "hellaswag,arc_easy (see --list_tasks)")
    p.add_argument("--list_tasks", action="store_true", help="print every task name lm-eval knows and exit")
    p.add_argument("--gguf_file", "--gguf-file", default=None, help="GGUF file inside MODEL to load the model from")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: MODEL)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default=None, help="torch device to run on, e.g. cpu, cuda:1 (default: cuda if "
                                                  "available, else cpu)")
    p.add_argument("--limit", type=float, default=None,
                   help="only the first N examples of each task (a fraction of each task if < 1)")
    p.add_argument("--batch_size", type=int, default=1, help="sequences per forward pass (default 1)")
    p.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--data_dir", default=None, help="folder with WikiText-2's wiki.test.raw for wikitext_lastword "
                                                    "(default: $BITDISTILL_WIKITEXT_DIR, else "
                                                    "../shared/data/wikitext-2-raw-v1)")
    p.add_argument("--output", default=None, help="also write the results as JSON to this file (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def _limit(value: float | None) -> int | float | None:
    if value is not None and value <= 0:
        raise ValueError(f"--limit must be > 0 (a count of examples, or a fraction below 1), got {value}")
    if value is None or value < 1:
        return value
    if value != int(value):
        raise ValueError(f"--limit is a count of examples (>= 1) or a fraction (< 1), got {value}")
    return int(value)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def format_table(results: dict[str, dict[str, float]]) -> str:
    """``task | metric | value`` lines, one metric a line."""
    rows = [("task", "metric", "value")]
    rows += [(task, name, f"{value:.4f}") for task, metrics in results.items() for name, value in metrics.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def run(args: argparse.Namespace) -> int:
    import torch

    from bitdistill.eval.harness import evaluate_tasks, list_tasks, load_for_eval, validate_tasks

    if args.list_tasks:
        print("\n".join(list_tasks()))
        return 0
    if not args.model or not args.tasks:
        raise ValueError("give MODEL and --tasks (comma-separated), e.g. bitdistill eval ./student --tasks "
                         "wikitext_lastword; bitdistill eval --list_tasks lists the task names")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    output = Path(args.output) if args.output else None
    if output is not None and output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
    limit = _limit(args.limit)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from exc
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    validate_tasks(tasks, data_dir=args.data_dir)
    model, tokenizer, kind = load_for_eval(args.model, gguf_file=args.gguf_file, dtype=args.dtype,
                                           tokenizer=args.tokenizer)
    model.to(device)
    results = evaluate_tasks(model, tokenizer, tasks, limit=limit, batch_size=args.batch_size,
                             num_fewshot=args.num_fewshot, data_dir=args.data_dir)
    scope = "" if not limit else (f", first {limit} examples per task" if limit >= 1 else
                                  f", first {limit:.0%} of the examples of each task")
    print(f"{args.model} ({kind}){scope}")
    print(format_table(results))
    if output is not None:
        _write_json(output, {"model": args.model, "gguf_file": args.gguf_file, "kind": kind, "tasks": tasks,
                             "limit": limit, "num_fewshot": args.num_fewshot, "results": results})
        print(f"wrote {output}")
    return 0
