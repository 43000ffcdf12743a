"""Run auditing for any ``transformers.Trainer``: a per-step time/memory log and a provenance record.

* :class:`AuditCallback` records, at every logging step, the mean optimizer-step time, tokens/s and
  peak memory since the previous logging step, and for every evaluation its time and peak memory. It
  runs garbage collection (and releases the CUDA cache) between training and evaluation rounds. Records
  go to ``<output_dir>/audit_log.jsonl`` (one JSON object a line) and, when ``report_to`` includes
  ``tensorboard``, to TensorBoard (run ``<output_dir>/runs/audit``, tags ``audit/...``).
* :func:`write_provenance` writes ``provenance.json`` (package, git commit, versions, device, every
  argument without secrets, the command) atomically.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` since the previous record (the counter is
reset after each record); on CPU, the process's resident high-water mark (``getrusage`` ``ru_maxrss``),
which is a lifetime maximum and so never decreases.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from bitdistill.io import atomic_write

__all__ = ["AUDIT_LOG_FILE", "PROVENANCE_FILE", "AuditCallback", "peak_memory_mb", "provenance", "redact_args",
           "redact_command", "release_memory", "tensorboard_into_output_dir", "write_provenance"]

AUDIT_LOG_FILE = "audit_log.jsonl"
PROVENANCE_FILE = "provenance.json"
# a name part (between underscores/dashes) that is a credential: hub_token, api_secret, db_password (not tokenizer_*)
_SECRET = re.compile(r"(?:^|[_-])(?:token|password|secret)(?:[_-]|$)", re.IGNORECASE)


def tensorboard_into_output_dir(trainer) -> None:
    """Make transformers' TensorBoard callback of ``trainer`` write to ``<output_dir>/runs/<date>_<host>``.

    transformers 5 chooses that folder in ``on_train_begin`` only, so an ``evaluate()`` before ``train()``
    (the start perplexity of ``distill`` / ``self-distill``) would create its writer with no folder, in
    ``./runs`` of the working directory. Older versions read ``args.logging_dir`` (already in the output).
    """
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and getattr(cb, "logging_dir", "") is None and cb.tb_writer is None:
            # only versions whose callback has its own logging_dir (5.x) get here; older ones lack default_logdir
            from transformers.integrations.integration_utils import default_logdir

            cb.logging_dir = os.path.join(trainer.args.output_dir, default_logdir())


def release_memory() -> None:
    """Garbage-collect and, on CUDA, return cached blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory_mb() -> tuple[float, str]:
    """``(megabytes, kind)``: CUDA ``max_memory_allocated`` on a CUDA machine, else this process's max RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_max_rss"


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


class AuditCallback(TrainerCallback):
    """Per-step time, throughput and peak memory, and per-evaluation time and peak memory, to JSONL and TensorBoard.

    Args:
        tokens_per_step: tokens consumed by one optimizer step over all processes (batch x accumulation x
            processes x sequence length). ``None``: taken from ``state.num_input_tokens_seen`` when the
            Trainer counts it (``include_num_input_tokens_seen``), else tokens/s is not recorded.
        log_file: the JSONL file; default ``<output_dir>/audit_log.jsonl``.

    Evaluations inside the training loop are timed from the step that requests them; call
    :meth:`evaluation_begins` before calling ``trainer.evaluate()`` yourself. Only the main process writes.
    """

    def __init__(self, tokens_per_step: int | None = None, log_file: str | os.PathLike | None = None) -> None:
        self.tokens_per_step = tokens_per_step
        self.log_file = Path(log_file) if log_file is not None else None
        self._writer = None
        self._step_start: float | None = None
        self._step_seconds: list[float] = []
        self._tokens_at_log = 0
        self._eval_start: float | None = None

    def _path(self, args) -> Path:
        return self.log_file or Path(args.output_dir) / AUDIT_LOG_FILE

    def _record(self, args, state, record: dict) -> None:
        if not state.is_world_process_zero:
            return
        path = self._path(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if "tensorboard" in (args.report_to or []):
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=os.path.join(
                    os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs"), "audit"))
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self._writer.add_scalar(f"audit/{record['event']}_{key}", value, record["step"])
            self._writer.flush()

    def on_train_begin(self, args, state, control, **kwargs):
        self._tokens_at_log = state.num_input_tokens_seen
        _reset_peak()
        mem, kind = peak_memory_mb()
        self._record(args, state, {"event": "train_begin", "step": state.global_step, "time": time.time(),
                                   "peak_memory_mb": mem, "memory_kind": kind})

    def on_step_begin(self, args, state, control, **kwargs):
        if self._step_start is None:
            self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is not None:
            self._step_seconds.append(time.perf_counter() - self._step_start)
            self._step_start = None
        if control.should_evaluate:
            self.evaluation_begins()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not self._step_seconds:
            return
        steps, seconds = len(self._step_seconds), sum(self._step_seconds)
        if self.tokens_per_step is not None:
            tokens = self.tokens_per_step * steps
        else:
            tokens = state.num_input_tokens_seen - self._tokens_at_log or None
        self._tokens_at_log = state.num_input_tokens_seen
        mem, kind = peak_memory_mb()
        self._record(args, state, {
            "event": "train", "step": state.global_step, "time": time.time(), "steps": steps,
            "step_time_s": seconds / steps, "tokens": tokens,
            "tokens_per_s": tokens / seconds if tokens and seconds > 0 else None,
            "peak_memory_mb": mem, "memory_kind": kind, "loss": logs["loss"],
            **{k: v for k, v in logs.items() if k.startswith("loss_")}})
        self._step_seconds = []
        _reset_peak()

    def evaluation_begins(self) -> None:
        """Free memory left by training, reset the peak counter and start the evaluation clock."""
        release_memory()
        _reset_peak()
        self._eval_start = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        seconds = time.perf_counter() - self._eval_start if self._eval_start is not None else None
        self._eval_start = None
        mem, kind = peak_memory_mb()
        self._record(args, state, {"event": "evaluate", "step": state.global_step, "time": time.time(),
                                   "eval_time_s": seconds, "peak_memory_mb": mem, "memory_kind": kind,
                                   "metrics": {k: v for k, v in (metrics or {}).items()
                                               if isinstance(v, (int, float))}})
        release_memory()
        _reset_peak()

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _is_secret(key: str) -> bool:
    return bool(_SECRET.search(key))


def redact_args(args: dict) -> dict:
    """A copy of ``args`` (nested dicts included) without keys naming a token, password or secret."""
    return {k: redact_args(v) if isinstance(v, dict) else v for k, v in args.items() if not _is_secret(str(k))}


def redact_command(command: str) -> str:
    """``command`` without ``--<secret> VALUE`` / ``--<secret>=VALUE`` options (token, password, secret)."""
    parts = shlex.split(command)
    out: list[str] = []
    skip = False
    for p in parts:
        if skip and not p.startswith("--"):
            continue
        skip = False
        if p.startswith("--") and _is_secret(p[2:].split("=", 1)[0]):
            skip = "=" not in p
            continue
        out.append(p)
    return " ".join(shlex.quote(p) for p in out)


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def _device() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def provenance(args: dict, command: str | None = None) -> dict:
    """What produced a run: package version, git commit (``"unknown"`` outside a checkout), versions, device,
    the arguments without secrets and the command without secrets."""
    import transformers

    from bitdistill._version import __version__

    return {"bitdistill": __version__, "git_commit": _git_commit(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "device": _device(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": redact_command(command) if command else None,
            "args": json.loads(json.dumps(redact_args(args), default=str))}


def write_provenance(output_dir: str | os.PathLike, args: dict, command: str | None = None, *,
                     name: str = PROVENANCE_FILE) -> Path:
    """Write :func:`provenance` as ``<output_dir>/<name>`` atomically (temp file + rename); returns the path.

    Raises:
        FileExistsError: the file exists already (provenance is never overwritten).
    """
    out = Path(output_dir) / name
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --output_dir")
    return atomic_write(out, json.dumps(provenance(args, command), indent=2), overwrite=False)
