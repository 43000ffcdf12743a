"""``BitNetConfig``: what a BitNet conversion does, and how a converted model's ``config.json`` records it.

In the spirit of torchao's ``quantize_(model, Config)``, one frozen dataclass is both the argument of
:func:`bitdistill.replace_linear_with_bitlinear` and, once resolved against a model, the marker saved in
its config (``config.bitdistill``)::

    {"format": "bitnet-b1.58-student", "version": 1, "modules_to_not_convert": [<exact names kept>],
     "use_rms_norm": false, "rms_norm_eps": 1e-06, "subln_modules": [...], "subln_eps": 1e-06,
     "weight_scale": "tensor"}

(``weight_scale`` is written only for ``"row"``; a marker without it, as every older student's, means ``"tensor"``.)

The marker lists the exact module names left in full precision (not the patterns the user gave), so
:func:`bitnet_config` reads back the config that reproduces the conversion exactly. :func:`folder_kind`
says what a local model folder holds (``plain``, ``student`` or ``packed``) from its ``config.json``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bitdistill.errors import UserError
from bitdistill.weights import read_config

__all__ = ["MARKER_FORMAT", "MARKER_KEY", "MARKER_VERSION", "WEIGHT_SCALES", "BitNetConfig", "bitnet_config", "check_weight_scale", "folder_kind",
           "is_packed_config", "marker_from_config", "read_config_json", "student_marker"]

MARKER_KEY = "bitdistill"
MARKER_FORMAT = "bitnet-b1.58-student"
MARKER_VERSION = 1
# quantization_config["quant_method"] of a packed (Hugging Face "bitnet") checkpoint.
PACKED_QUANT_METHOD = "bitnet"

FolderKind = Literal["plain", "student", "packed"]
#: ``BitNetConfig.weight_scale``: one absmean weight scale per tensor (BitNet b1.58, the default) or per output row.
WEIGHT_SCALES = ("tensor", "row")


@dataclass(frozen=True)
class BitNetConfig:
    """How to convert a model's linear layers to BitLinear.

    Attributes:
        modules_to_not_convert: skip patterns, matched as transformers does (module-boundary prefix, regex,
            suffix; see :func:`bitdistill.nn.replace.matches_module_pattern`).
        use_rms_norm: give every converted layer an in-layer RMSNorm before activation quantization.
        rms_norm_eps: epsilon of that RMSNorm.
        convert_output_head: also convert the output head (``model.get_output_embeddings()``), which is
            otherwise kept full precision whatever its name.
        subln_modules: converted modules that get a SubLN norm (an in-layer RMSNorm, weight 1), e.g. from
            :func:`bitdistill.nn.subln.subln_module_names`; ``insert_subln`` also calibrates them.
        subln_eps: epsilon of the SubLN norms.
        weight_scale: ``"tensor"`` (one absmean scale per weight tensor, BitNet b1.58) or ``"row"`` (one per
            output row, as ParetoQ's ternary models). A per-row student packs into bitdistill's extension of the
            packed format, which plain transformers' ``bitnet`` loader cannot hold (``docs/pack.md``).
    """

    modules_to_not_convert: tuple[str, ...] = ("lm_head",)
    use_rms_norm: bool = False
    rms_norm_eps: float = 1e-6
    convert_output_head: bool = False
    subln_modules: tuple[str, ...] = field(default=())
    subln_eps: float = 1e-6
    weight_scale: Literal["tensor", "row"] = "tensor"

    def __post_init__(self) -> None:
        for name in ("modules_to_not_convert", "subln_modules"):
            value = getattr(self, name)
            value = value if isinstance(value, str) else tuple(value)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"BitNetConfig.{name} must be a sequence of strings, got {value!r}")
            object.__setattr__(self, name, value)
        for name in ("rms_norm_eps", "subln_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"BitNetConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.weight_scale not in WEIGHT_SCALES:
            raise ValueError(f"BitNetConfig.weight_scale must be one of {', '.join(WEIGHT_SCALES)}, got "
                             f"{self.weight_scale!r}")


def check_weight_scale(value: str, where: str = "--weight_scale") -> str:
    """``value`` if it is one of :data:`WEIGHT_SCALES`, else a one-line :class:`UserError` naming ``where``."""
    if value not in WEIGHT_SCALES:
        raise UserError(f"{where} must be one of {', '.join(WEIGHT_SCALES)}, got {value!r}; pass {where} tensor "
                        f"(one scale per weight tensor, the default) or {where} row (one per output row)")
    return value


def _is_dict_config(config) -> bool:
    return isinstance(config, dict)


def student_marker(config_or_model) -> dict | None:
    """The BitNet-student marker of a config, a ``config.json`` dict or a model, or ``None`` if it is not one."""
    if _is_dict_config(config_or_model):
        marker = config_or_model.get(MARKER_KEY)
    else:
        config = getattr(config_or_model, "config", config_or_model)
        marker = getattr(config, MARKER_KEY, None)
    if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT:
        return marker
    return None


def marker_from_config(config: BitNetConfig, kept: Iterable[str], previous: dict | None = None) -> dict:
    """The ``config.bitdistill`` marker of a model converted with ``config`` that kept the modules ``kept``.

    ``previous`` (the model's marker before this conversion, if any) keeps its other keys and its in-layer
    norm setting, so converting twice or after SubLN records the union. ``weight_scale`` is recorded only when
    ``"row"`` (markers without it read as ``"tensor"``).
    """
    previous = previous or {}
    marker = {
        **previous,
        "format": MARKER_FORMAT,
        "version": MARKER_VERSION,
        "use_rms_norm": bool(config.use_rms_norm or previous.get("use_rms_norm", False)),
        "rms_norm_eps": float(previous.get("rms_norm_eps", config.rms_norm_eps)),
        "modules_to_not_convert": sorted(kept),
    }
    if config.subln_modules:
        marker.update(subln_modules=list(config.subln_modules), subln_eps=float(config.subln_eps))
    if config.weight_scale != "tensor":
        marker["weight_scale"] = config.weight_scale
    return marker


def bitnet_config(source) -> BitNetConfig | None:
    """The :class:`BitNetConfig` that reproduces a student's conversion, read from its marker; ``None`` if none.

    Args:
        source: a model, a transformers config, a ``config.json`` dict, or a local model folder.

    Returns:
        The kept modules as exact-name patterns, ``convert_output_head=True`` (the kept list decides), the
        in-layer norm, SubLN and weight-scale settings as recorded.

    Raises:
        UserError: the marker's ``weight_scale`` is not one this version knows.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        source = read_config_json(path) if (path / "config.json").is_file() else {}
    marker = student_marker(source)
    if marker is None:
        return None
    weight_scale = marker.get("weight_scale", "tensor")
    if weight_scale not in WEIGHT_SCALES:
        raise UserError(f"the student's config.json records weight_scale={weight_scale!r}, which this bitdistill does "
                        f"not know (one of {', '.join(WEIGHT_SCALES)}); upgrade bitdistill or re-convert the student")
    return BitNetConfig(modules_to_not_convert=tuple(re.escape(n) + "$" for n in marker["modules_to_not_convert"]),
                        use_rms_norm=bool(marker["use_rms_norm"]), rms_norm_eps=float(marker["rms_norm_eps"]),
                        convert_output_head=True, subln_modules=tuple(marker.get("subln_modules") or ()),
                        subln_eps=float(marker.get("subln_eps", 1e-6)), weight_scale=weight_scale)


def read_config_json(path: str | Path) -> dict:
    """The ``config.json`` of the model folder ``path`` as a dict (:func:`bitdistill.weights.read_config`, the one
    reader: one-line errors for a missing folder or file, invalid JSON or UTF-8, a JSON value that is no object)."""
    return read_config(path)


def is_packed_config(config) -> bool:
    """Whether a config (object or dict) describes a ``bitnet``-quantized (packed) model."""
    qc = config.get("quantization_config") if _is_dict_config(config) else getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    return isinstance(qc, dict) and qc.get("quant_method") == PACKED_QUANT_METHOD


def folder_kind(path: str | Path, *, required: bool = False) -> FolderKind | None:
    """What the local model folder ``path`` holds, from its ``config.json``.

    Args:
        path: a model folder (or a hub id, ``tiny:<arch>``, a GGUF folder: not a kind).
        required: raise (one line, as :func:`read_config_json`) instead of returning ``None``.

    Returns:
        ``"packed"`` (a ``bitnet`` ``quantization_config``), ``"student"`` (the bitdistill marker),
        ``"plain"`` (any other model folder), or ``None`` when ``path`` is not a local folder with a
        ``config.json``.

    Raises:
        ValueError: ``config.json`` is not valid JSON.
    """
    path = Path(str(path))
    if not required and not (path / "config.json").is_file():
        return None
    config = read_config_json(path)
    if is_packed_config(config):
        return "packed"
    if MARKER_KEY in config:  # a marker of an unknown format is a student load_student refuses, not a plain model
        return "student"
    return "plain"
