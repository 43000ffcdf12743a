"""Convert a causal LM's linear layers to :class:`BitLinear`, in place, keeping their trained weights.

``replace_linear_with_bitlinear(model)`` swaps every ``nn.Linear`` (and GPT-2 style ``Conv1D``) for a
BitLinear that *shares* its parameters, so device, dtype, ``requires_grad``, tied weights and
state-dict keys are unchanged. The embedding and the output head stay full precision by default.
The model's config records that it is a BitNet student (``config.bitdistill``), which
:func:`load_student` and ``bitdistill pack`` read back.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bitdistill.errors import UserError
from bitdistill.nn.arch import is_conv1d
from bitdistill.nn.bitlinear import BitConv1D, BitLinear
from bitdistill.nn.config import (
    MARKER_KEY,
    BitNetConfig,
    bitnet_config,
    folder_kind,
    marker_from_config,
    student_marker,
)
from bitdistill.nn.subln import attach_subln_norms
from bitdistill.weights import (
    check_shapes,
    from_local_folder,
    read_config,
    read_tensors,
    tensor_index,
    validate_loaded,
    weight_files,
)

__all__ = [
    "MARKER_KEY",
    "BitNetConfig",
    "ConversionReport",
    "load_student",
    "matches_module_pattern",
    "replace_linear_with_bitlinear",
    "student_marker",
]

_UNSET = object()  # "keyword not given" (None is a valid modules_to_not_convert: convert everything)


def matches_module_pattern(name: str, pattern: str) -> bool:
    """Whether module ``name`` matches a skip ``pattern`` the way transformers' ``modules_to_not_convert`` does.

    A pattern matches (1) from the start of the name up to a module boundary (``"model.layers.1"``
    matches ``"model.layers.1.mlp"`` but not ``"model.layers.11.mlp"``), (2) as a regex with the
    same boundary (``"model.layers.*.mlp"``), or (3) as a plain suffix (``"lm_head"``, ``"q_proj"``).
    """
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    try:
        if re.match(rf"(?:{pattern}){boundary}", name):
            return True
    except re.error:
        pass
    return name.endswith(pattern)


@dataclass
class ConversionReport:
    """What :func:`replace_linear_with_bitlinear` did.

    Attributes:
        converted: names of the modules converted by this call.
        already_converted: names of modules that were BitLinear before the call.
        skipped: ``{name: reason}`` for every linear module left in full precision.
        unmatched_patterns: skip patterns that matched no module (probably a typo).
    """

    converted: list[str] = field(default_factory=list)
    already_converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unmatched_patterns: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} linear layers to BitLinear"
                 f" ({len(self.already_converted)} already BitLinear, {len(self.skipped)} kept full precision)"]
        lines += [f"  kept {name}: {reason}" for name, reason in self.skipped.items()]
        if self.unmatched_patterns:
            lines.append(f"  patterns that matched nothing: {self.unmatched_patterns}")
        return "\n".join(lines)


def _check_finite(name: str, module: nn.Module) -> None:
    for pname, p in module.named_parameters(recurse=False):
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise UserError(
                f"cannot convert {name!r}: its {pname} contains NaN or Inf, and the absmean scale of a ternary "
                "weight would be NaN; fix or re-initialize the weights before converting"
            )


def _output_head_names(model: nn.Module) -> set[str]:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def replace_linear_with_bitlinear(
    model: nn.Module,
    config: BitNetConfig | None = None,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    modules_to_not_convert: Iterable[str] | None = _UNSET,
    use_rms_norm: bool = _UNSET,
    rms_norm_eps: float = _UNSET,
    convert_output_head: bool = _UNSET,
    weight_scale: str = _UNSET,
) -> ConversionReport:
    """Convert ``model``'s ``nn.Linear`` and ``Conv1D`` layers to BitLinear, in place, as ``config`` says.

    Args:
        model: any ``nn.Module``; usually a transformers causal LM. Mutated in place.
        config: a :class:`BitNetConfig` (default ``BitNetConfig()``: everything but the output head and
            ``lm_head``). Skip patterns that match nothing warn.
        filter_fn: ``filter_fn(module, name) -> bool``; only modules for which it returns True are converted.
        modules_to_not_convert, use_rms_norm, rms_norm_eps, convert_output_head, weight_scale: a convenience for
            ``config=BitNetConfig(...)`` with these fields (not together with ``config``).

    Returns:
        A :class:`ConversionReport`. Converting twice is a no-op (already-converted layers are reported).
        The model's config records the conversion (:func:`bitdistill.nn.config.bitnet_config` reads it back).

    Raises:
        ValueError: a weight to convert contains NaN/Inf; both ``config`` and keyword fields given.
    """
    fields = {k: v for k, v in (("modules_to_not_convert", modules_to_not_convert), ("use_rms_norm", use_rms_norm),
                                ("rms_norm_eps", rms_norm_eps), ("convert_output_head", convert_output_head),
                                ("weight_scale", weight_scale))
              if v is not _UNSET}
    if config is not None and fields:
        raise ValueError(f"pass either a BitNetConfig or its fields as keywords, not both (got {', '.join(fields)})")
    if "modules_to_not_convert" in fields:
        fields["modules_to_not_convert"] = tuple(fields["modules_to_not_convert"] or ())
    config = config if config is not None else BitNetConfig(**fields)
    use_rms_norm, rms_norm_eps = config.use_rms_norm, config.rms_norm_eps
    convert_output_head = config.convert_output_head
    per_row = config.weight_scale == "row"
    patterns = list(config.modules_to_not_convert)
    used_patterns: set[str] = set()
    heads = set() if convert_output_head else _output_head_names(model)
    report = ConversionReport()
    targets: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            if module.per_row != per_row:
                raise UserError(f"{name!r} is already a BitLinear with weight_scale="
                                f"{'row' if module.per_row else 'tensor'}; convert the whole model with one "
                                "weight_scale (the student's own marker records it)")
            report.already_converted.append(name)
            continue
        is_linear = isinstance(module, nn.Linear)
        if not (is_linear or is_conv1d(module)):
            continue
        hit = [p for p in patterns if matches_module_pattern(name, p)]
        used_patterns.update(hit)
        if hit:
            report.skipped[name] = f"matches modules_to_not_convert pattern {hit[0]!r}"
        elif name in heads:
            report.skipped[name] = "output head (pass convert_output_head=True to convert it)"
        elif isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            report.skipped[name] = "output projection of nn.MultiheadAttention, which reads its weight directly"
        elif filter_fn is not None and not filter_fn(module, name):
            report.skipped[name] = "filter_fn returned False"
        else:
            _check_finite(name, module)
            targets.append((name, module))

    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if is_conv1d(module):
            new = BitConv1D.from_conv1d(module, use_rms_norm=use_rms_norm, rms_norm_eps=rms_norm_eps, per_row=per_row)
        else:
            new = BitLinear.from_linear(module, use_rms_norm=use_rms_norm, rms_norm_eps=rms_norm_eps, per_row=per_row)
        setattr(parent, child, new)
        report.converted.append(name)

    report.unmatched_patterns = [p for p in patterns if p not in used_patterns]
    for p in report.unmatched_patterns:
        if not (p == "lm_head" and "lm_head" not in dict(model.named_modules())):
            warnings.warn(f"modules_to_not_convert pattern {p!r} matched no linear module; check its spelling",
                          stacklevel=2)
    if not report.converted and not report.already_converted:
        warnings.warn(f"replace_linear_with_bitlinear converted nothing: {type(model).__name__} has no nn.Linear or "
                      f"Conv1D layer outside the skip list ({len(report.skipped)} skipped)", stacklevel=2)
    if report.converted or report.already_converted:
        _mark_config(model, config)
    if config.subln_modules:
        attach_subln_norms(model, list(config.subln_modules), config.subln_eps)
    return report


def _mark_config(model: nn.Module, config: BitNetConfig) -> None:
    model_config = getattr(model, "config", None)
    if model_config is None:
        return
    kept = [name for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or is_conv1d(m)) and not isinstance(m, BitLinear)]
    setattr(model_config, MARKER_KEY, marker_from_config(config, kept, getattr(model_config, MARKER_KEY, None)))


def is_student_folder(path: str | Path) -> bool:
    """Whether ``path`` is a local model folder whose ``config.json`` carries the student marker."""
    return folder_kind(path) == "student"


def load_student(path: str | Path, **from_pretrained_kwargs):
    """Load a BitNet student saved with ``save_pretrained`` and convert it back to BitLinear.

    Args:
        path: a folder written by ``model.save_pretrained`` after :func:`replace_linear_with_bitlinear`.
        **from_pretrained_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``).

    Returns:
        The model converted as its marker records (:func:`bitdistill.nn.config.bitnet_config`), and in-layer
        RMSNorm weights restored when used (every layer with ``use_rms_norm``; the SubLN ``subln_modules``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = bitnet_config(read_config(path))
    if config is None:
        raise UserError(f"{path} is not a bitdistill BitNet student (config.json has no '{MARKER_KEY}' marker); "
                        "convert a plain model with replace_linear_with_bitlinear instead")
    tensor_index(path)
    check_shapes(path, from_local_folder(AutoConfig.from_pretrained, path))
    extra = ".rms_norm.weight" if config.use_rms_norm or config.subln_modules else None
    model = from_local_folder(AutoModelForCausalLM.from_pretrained, path, model=True,
                              extra_suffixes=(extra,) if extra else (), **from_pretrained_kwargs)
    validate_loaded(model, path, check_files=bool(weight_files(path)))  # before conversion: names tensor and file
    replace_linear_with_bitlinear(model, config)
    if extra:
        _load_extra_tensors(model, path, suffix=extra)
    validate_loaded(model, path, check_files=bool(weight_files(path)))
    return model


def _load_extra_tensors(model: nn.Module, path: Path, suffix: str) -> None:
    """Load tensors whose key ends with ``suffix`` from the folder's safetensors (they are absent from the base model)."""
    state = model.state_dict()
    for key, t in read_tensors(path, [k for k in state if k.endswith(suffix)]).items():
        with torch.no_grad():
            state[key].copy_(t)
