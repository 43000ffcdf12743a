"""Students built from a config, embedding/head transfer from the teacher, and frozen embeddings/head."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from bitdistill.convert import parse_dtype
from bitdistill.errors import UserError

__all__ = ["freeze_embeddings", "student_from_config", "transfer_embeddings"]

logger = logging.getLogger(__name__)


def student_from_config(spec: str, dtype: str | torch.dtype = "float32") -> nn.Module:
    """A randomly initialized causal LM (seeded by torch's RNG) from ``spec``: a ``config.json`` file, a folder
    holding one, or ``tiny:<arch>``.

    Raises:
        FileNotFoundError: no such file or folder; ValueError: the config is not a causal-LM config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.startswith("tiny:"):
        from bitdistill.models import tiny_config

        config = tiny_config(spec.split(":", 1)[1])
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"student config {spec} not found (give a config.json, a folder holding one, "
                                    "or tiny:<arch>)")
        data = json.loads(path.read_text())
        if "model_type" not in data:
            raise UserError(f"{path} has no model_type; it is not a transformers model config")
        data.pop("bitdistill", None)
        try:
            config = AutoConfig.for_model(**data)
        except Exception as exc:  # transformers' and huggingface_hub's config validation errors
            raise UserError(f"invalid student config {path}: {str(exc).strip().splitlines()[-1]}") from exc
    try:
        return AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype))
    except ValueError as exc:
        raise UserError(f"cannot build a causal LM from the student config {spec}: {exc}") from exc


def _module(model: nn.Module, which: str) -> nn.Module | None:
    try:
        return getattr(model, f"get_{which}_embeddings")()
    except NotImplementedError:
        return None


def _tied(model: nn.Module) -> bool:
    head, emb = _module(model, "output"), _module(model, "input")
    return head is not None and emb is not None and head.weight is emb.weight


def transfer_embeddings(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Copy the teacher's input embedding and output head (weight, and bias when both have one) into ``student``.

    Returns the names of the copied tensors. Raises ValueError when vocabularies or widths differ.
    """
    t_in, s_in = _module(teacher, "input"), _module(student, "input")
    t_out, s_out = _module(teacher, "output"), _module(student, "output")
    if t_in is None or s_in is None or t_out is None or s_out is None:
        raise UserError("--transfer_embeddings needs input embeddings and an output head in both teacher and student")
    if t_in.weight.shape[0] != s_in.weight.shape[0] or t_out.weight.shape[0] != s_out.weight.shape[0]:
        raise UserError(f"--transfer_embeddings: the vocabularies differ (teacher {t_in.weight.shape[0]} tokens, "
                        f"student {s_in.weight.shape[0]}); give the student config the teacher's vocab_size")
    if t_in.weight.shape[1] != s_in.weight.shape[1]:
        raise UserError(f"--transfer_embeddings: the hidden sizes differ (teacher {t_in.weight.shape[1]}, student "
                        f"{s_in.weight.shape[1]}); give the student config the teacher's hidden size or drop the flag")
    copied = ["input embedding"]
    with torch.no_grad():
        s_in.weight.copy_(t_in.weight)
        if _tied(student):
            if not _tied(teacher):
                logger.warning("--transfer_embeddings: the student ties its head to its input embedding, so it gets "
                               "the teacher's input embedding for both (the teacher's separate head is not copied)")
        else:
            s_out.weight.copy_(t_out.weight)
            copied.append("output head")
        if getattr(s_out, "bias", None) is not None and getattr(t_out, "bias", None) is not None:
            s_out.bias.copy_(t_out.bias)
            copied.append("output head bias")
    return copied


def freeze_embeddings(model: nn.Module, *, embeddings: bool, lm_head: bool) -> list[str]:
    """Set ``requires_grad=False`` on the input embedding and/or the output head of ``model`` (in place).

    Tied weights are one tensor, so freezing either freezes both; a warning says so. Returns the names of
    the frozen parameters. Raises ValueError when the model has no such module.
    """
    targets = []
    if embeddings:
        module = _module(model, "input")
        if module is None:
            raise UserError(f"--freeze_embeddings: {type(model).__name__} has no input embedding module")
        targets.append(module)
    if lm_head:
        module = _module(model, "output")
        if module is None:
            raise UserError(f"--freeze_lm_head: {type(model).__name__} has no output head module")
        targets.append(module)
    for module in targets:
        module.requires_grad_(False)
    if targets and _tied(model) and len(targets) == 1:
        flag, other = ("--freeze_embeddings", "output head") if embeddings else ("--freeze_lm_head", "input embedding")
        logger.warning("%s also freezes the %s: the model ties them (one shared tensor)", flag, other)
    names = {id(p) for m in targets for p in m.parameters()}
    return [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in names]
