"""Trainer checkpoints a crash cannot poison: ``checkpoint-N`` appears only when complete.

:class:`AtomicCheckpointMixin` makes ``transformers.Trainer`` write each checkpoint into a hidden staging
folder ``.checkpoint-N.partial`` of the output folder and rename it to ``checkpoint-N`` once everything
(weights, optimizer, scheduler, RNG and trainer state, and the files in ``checkpoint_files``) is written.
A crash, a full disk or ``kill -9`` leaves at most a staging folder, which :func:`clean_partial_checkpoints`
removes and ``--resume_from_checkpoint latest`` (:func:`latest_checkpoint`) never picks.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from bitdistill.errors import UserError
from bitdistill.io import rename_noreplace, user_error_from_write

__all__ = ["AtomicCheckpointMixin", "clean_partial_checkpoints", "is_complete_checkpoint", "latest_checkpoint",
           "require_complete"]

logger = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_PARTIAL_RE = re.compile(r"^\.checkpoint-\d+\.partial$")
TRAINER_STATE = "trainer_state.json"


def is_complete_checkpoint(folder: Path, required: tuple[str, ...] = ()) -> bool:
    """Whether ``folder`` holds a trainer state, weights and every file of ``required``."""
    return ((folder / TRAINER_STATE).is_file() and any(folder.glob("*.safetensors"))
            and all((folder / name).is_file() for name in required))


def latest_checkpoint(output_dir: str | os.PathLike, required: tuple[str, ...] = ()) -> Path | None:
    """The highest-numbered complete ``checkpoint-N`` of ``output_dir`` (incomplete ones are skipped, and named).

    Args:
        output_dir: the run folder.
        required: files a complete checkpoint must hold besides the trainer state and the weights.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = sorted(((int(m[1]), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()),
                   reverse=True)
    for _, path in found:
        if is_complete_checkpoint(path, required):
            return path
        logger.warning("skipping %s: incomplete (written by an older version or damaged)", path)
    return None


def clean_partial_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Remove the staging folders a killed run left in ``output_dir``; return them (each is logged)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    removed = [p for p in folder.iterdir() if _PARTIAL_RE.match(p.name)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
        logger.warning("removed %s, a checkpoint a killed run did not finish", p)
    return removed


def _rotate(trainer, run_dir: str) -> None:
    """Delete checkpoints beyond ``save_total_limit`` (transformers >= 5 has a function, 4.x a method)."""
    if hasattr(trainer, "_rotate_checkpoints"):
        trainer._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
        return
    from transformers.trainer_utils import rotate_checkpoints

    rotate_checkpoints(output_dir=run_dir, save_total_limit=trainer.args.save_total_limit,
                       best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)


class AtomicCheckpointMixin:
    """Mix into a ``transformers.Trainer`` subclass (before ``Trainer``) so checkpoints appear only complete.

    Attributes:
        checkpoint_files: ``{file name: text, or a function returning it}`` written into every checkpoint before it
            becomes visible (e.g. the run configuration a resume is checked against, a CPU budget's state).
    """

    checkpoint_files: dict[str, str | Callable[[], str]] | None = None

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self.args.output_dir
        name = f"checkpoint-{self.state.global_step}"
        staging = Path(run_dir) / f".{name}.partial"
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        except BaseException as exc:
            user = user_error_from_write(exc, Path(run_dir) / name, run_dir)  # before removing: that frees the space
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if user is not None:
                raise user from exc
            raise
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._publish(staging, Path(run_dir) / name)
            _rotate(self, run_dir)
        self.accelerator.wait_for_everyone()

    def _publish(self, staging: Path, final: Path) -> None:
        written = staging / final.name
        try:
            for file_name, text in (self.checkpoint_files or {}).items():
                (written / file_name).write_text(text() if callable(text) else text)
            if final.exists():  # the same step saved again (e.g. the last step): replace it
                shutil.rmtree(final)
            rename_noreplace(written, final)
        except OSError as exc:
            user = user_error_from_write(exc, final, staging.parent)
            shutil.rmtree(staging, ignore_errors=True)
            raise (user or exc) from exc
        shutil.rmtree(staging, ignore_errors=True)
        if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint) == written:
            self.state.best_model_checkpoint = str(final)


def require_complete(checkpoint: Path, required: tuple[str, ...] = ()) -> None:
    """:class:`UserError` unless ``checkpoint`` is a complete checkpoint (named in the message)."""
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {checkpoint} does not exist")
    if not is_complete_checkpoint(checkpoint, required):
        missing = [n for n in (TRAINER_STATE, *required) if not (checkpoint / n).is_file()]
        what = ", ".join(missing) or "weights (*.safetensors)"
        raise UserError(f"--resume_from_checkpoint {checkpoint} is incomplete (no {what}); resume from an earlier "
                        "checkpoint or with --resume_from_checkpoint latest")
