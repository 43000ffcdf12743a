"""Downstream evaluation through lm-evaluation-harness (the optional extra ``bitdistill[eval]``).

:func:`load_for_eval` loads a teacher, a latent-weight student folder or a packed folder;
:func:`evaluate_tasks` runs lm-eval's ``simple_evaluate`` on that already-loaded model. Besides
lm-eval's own tasks (they download their data sets), bitdistill ships ``wikitext_lastword``, built
offline from WikiText-2 (see :mod:`bitdistill.eval.lastword`). lm-eval is imported only when a
function here needs it.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from bitdistill.eval.lastword import METADATA_KEY, TASK_DIR, TASK_NAME, resolve_wikitext_file
from bitdistill.nn.config import folder_kind

__all__ = ["EvalExtraMissing", "evaluate_tasks", "list_tasks", "load_for_eval", "local_tasks", "validate_tasks"]

INSTALL_HINT = "pip install 'bitdistill[eval]'"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class EvalExtraMissing(ImportError, ValueError):
    """lm-evaluation-harness is not installed (a ``ValueError`` too, so the CLI reports it in one line)."""


def _lm_eval():
    try:
        import lm_eval
    except ImportError as exc:
        raise EvalExtraMissing(f"downstream evaluation needs lm-evaluation-harness: {INSTALL_HINT}") from exc
    return lm_eval


def local_tasks() -> list[str]:
    """Names of the tasks bitdistill ships (one YAML file each in ``bitdistill/eval/tasks``)."""
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


@functools.lru_cache(maxsize=4)
def _task_manager(include_defaults: bool, data_dir: str | None):
    from lm_eval.tasks import TaskManager

    metadata = {METADATA_KEY: data_dir} if data_dir is not None else None
    return TaskManager(include_path=str(TASK_DIR), include_defaults=include_defaults, metadata=metadata)


def list_tasks() -> list[str]:
    """Every task, group and tag name lm-eval knows, bitdistill's local tasks included (scans ~15k YAML files)."""
    _lm_eval()
    with _quiet_lm_eval():
        return list(_task_manager(True, None).all_tasks)


def _validated_manager(tasks: Sequence[str], data_dir: str | None):
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t.strip() for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    local = set(local_tasks())
    if all(t in local for t in tasks):
        manager = _task_manager(False, data_dir)
    else:
        manager = _task_manager(True, data_dir)
        _check_known(tasks, manager.all_tasks)
    if TASK_NAME in tasks:
        resolve_wikitext_file(data_dir)
    return manager


def _check_known(tasks: Sequence[str], known: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = sorted({m for t in unknown for m in difflib.get_close_matches(t, known, n=3, cutoff=0.6)})
        near = f" (close: {', '.join(hints)})" if hints else ""
        raise ValueError(f"unknown lm-eval task {', '.join(map(repr, unknown))}{near}; "
                         f"list the task names with: bitdistill eval --list_tasks")


def validate_tasks(tasks: Sequence[str], *, data_dir: str | os.PathLike | None = None) -> None:
    """Check, before any model is loaded, that lm-eval is installed and knows every name in ``tasks``.

    Raises:
        EvalExtraMissing: lm-eval is not installed.
        ValueError: an unknown task name (the message lists close matches and how to list tasks).
        FileNotFoundError: ``wikitext_lastword`` is asked for but ``wiki.test.raw`` is not found.
    """
    _lm_eval()
    with _quiet_lm_eval():
        _validated_manager(tasks, str(data_dir) if data_dir is not None else None)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _metrics(raw: dict) -> dict[str, float]:
    out = {}
    for key, value in raw.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name, _, filt = key.partition(",")
        out[name if filt in ("", "none") else key] = float(value)
    return out


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    data_dir: str | os.PathLike | None = None,
    bootstrap_iters: int = 0,
) -> dict[str, dict[str, float]]:
    """Evaluate a loaded causal LM on lm-eval tasks; returns ``{task: {metric: value}}``.

    Args:
        model: a ``transformers`` causal LM (teacher, BitNet student or packed model) on the device to
            run on; it is evaluated in eval mode and its train/eval mode is restored afterwards.
        tokenizer: its tokenizer (lm-eval works on a copy: it may set a padding token).
        tasks: lm-eval task names (``bitdistill eval --list_tasks``), e.g. ``["wikitext_lastword"]``.
        limit: evaluate only the first ``limit`` examples of each task (a fraction if < 1).
        batch_size: sequences per forward pass.
        num_fewshot: few-shot examples in each prompt (default: each task's own setting).
        data_dir: folder with WikiText-2's ``wiki.test.raw`` for ``wikitext_lastword`` (default:
            ``$BITDISTILL_WIKITEXT_DIR``, else ``../shared/data/wikitext-2-raw-v1``).
        bootstrap_iters: resamples for standard errors (0: none, the fastest).

    Metric names drop lm-eval's ``,none`` filter suffix (``acc``, ``perplexity``, ``acc_norm``, ...).

    Raises:
        EvalExtraMissing: lm-eval is not installed.
        ValueError: unknown task names (with close matches), or a bad ``limit``/``batch_size``.
    """
    _lm_eval()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    tasks = list(tasks) if not isinstance(tasks, str) else tasks
    data_dir = str(data_dir) if data_dir is not None else None
    was_training = model.training
    with _quiet_lm_eval():
        manager = _validated_manager(tasks, data_dir)
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        try:
            out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, bootstrap_iters=bootstrap_iters, log_samples=False,
                                  verbosity="ERROR")
        finally:
            model.train(was_training)
    return {task: _metrics(raw) for task, raw in out["results"].items()}


def load_for_eval(path: str | os.PathLike, *, gguf_file: str | None = None, dtype: str = "float32",
                  tokenizer: str | os.PathLike | None = None):
    """Load any model bitdistill handles, with its tokenizer, ready for :func:`evaluate_tasks`.

    Args:
        path: a model folder (plain, BitNet student or packed), a hub id, or the folder of ``gguf_file``.
        gguf_file: a GGUF file inside ``path`` (a full-precision model).
        dtype: floating-point dtype (``float32``, ``bfloat16``, ``float16``).
        tokenizer: where to load the tokenizer from (default: ``path``).

    Returns:
        ``(model, tokenizer, kind)`` with ``kind`` one of ``"full-precision"``, ``"student"`` (the config
        carries the bitdistill marker; BitLinear layers) or ``"packed"`` (``quant_method == "bitnet"``).
    """
    from transformers import AutoTokenizer

    from bitdistill.convert import load_causal_lm, parse_dtype

    torch_dtype = parse_dtype(dtype)
    folder = Path(path)
    local = folder.exists() or gguf_file is not None or not _HUB_ID.fullmatch(str(path))
    if local and not folder.is_dir():
        raise FileNotFoundError(f"{folder} {'is not a folder' if folder.exists() else 'does not exist'}; pass a model "
                                "folder, a hub id, or the folder of a GGUF file with --gguf_file")
    if gguf_file is not None and not (folder / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} not found in {folder}")
    if local and gguf_file is None and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json); pass a folder written by "
                                "save_pretrained / bitdistill, a hub id, or --gguf_file")
    found = folder_kind(folder) if local and gguf_file is None else None
    if found == "packed":
        from bitdistill.export import load_packed

        model, kind = load_packed(folder, dtype=torch_dtype), "packed"
    elif found == "student":
        from bitdistill.nn.replace import load_student

        model, kind = load_student(folder, dtype=torch_dtype).eval(), "student"
    else:
        try:
            model = load_causal_lm(str(path), gguf_file=gguf_file, dtype=torch_dtype)
        except OSError as exc:
            raise FileNotFoundError(f"could not load {path} (not a local folder; as a hub id: {exc})") from exc
        kind = "full-precision"
    tok_src = str(tokenizer) if tokenizer is not None else str(path)
    try:
        tok = AutoTokenizer.from_pretrained(tok_src, gguf_file=gguf_file if tokenizer is None else None)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"no tokenizer found at {tok_src}; pass --tokenizer (a folder or hub id)") from exc
    return model, tok, kind
