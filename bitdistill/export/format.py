"""The Hugging Face ``bitnet`` packed format: what a packed folder holds, and which layers a model packs.

The format (DESIGN.md "Packed format"): every converted linear layer ``<m>`` is stored as
``<m>.weight`` ``uint8 [out/4, in]`` (2-bit codes, :mod:`bitdistill.quant.packing`) and
``<m>.weight_scale`` float32 ``[1]`` = ``1 / gamma``; biases, in-layer RMSNorm weights and every
other tensor stay floating point; ``config.json`` carries ``quantization_config`` =
``{"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
"modules_to_not_convert": [...]}``. Plain ``transformers.AutoModelForCausalLM.from_pretrained``
loads it; :func:`bitdistill.export.loader.load_packed` loads it with :class:`bitdistill.nn.PackedBitLinear`
layers; :func:`bitdistill.export.writer.save_packed` writes it.

bitdistill's extension (``docs/pack.md``), for students the format cannot express: an in-layer RMSNorm on some
converted layers only (SubLN beside q/k norms, Gemma's extra norms, ... on architectures transformers'
``BitNetForCausalLM`` does not cover) or GPT-2 style ``Conv1D`` projections. The tensors are the same (a
``Conv1D`` layer's codes stored ``[out/4, in]`` like any other, its transposed weight; ``<m>.rms_norm.weight``
where the norm is; ``<m>.weight_scale`` float32 ``[out]``, ``1 / gamma_r`` per output row, for a per-row
student, with ``"weight_scale": "row"``), and ``quantization_config`` says ``"linear_class": "bitdistill"`` with
``"rms_norm_modules": [...]`` and ``"rms_norm_eps"``: plain transformers refuses that ``linear_class`` in one
line rather than load a model that would compute something else; ``load_packed`` builds the architecture and
puts a :class:`~bitdistill.nn.PackedBitLinear` wherever the folder holds a ``weight_scale``.
"""

from __future__ import annotations

from torch import nn

from bitdistill.errors import UserError
from bitdistill.nn.arch import is_conv1d
from bitdistill.nn.bitlinear import BitConv1D, BitLinear
from bitdistill.nn.config import is_packed_config
from bitdistill.nn.packed import PackedBitLinear
from bitdistill.nn.replace import matches_module_pattern

__all__ = ["COPY_FILES", "DEFAULT_MAX_SHARD_BYTES", "EXTENSION_LINEAR_CLASS", "check_packed_config",
           "converted_layers", "is_extension", "is_packed_config", "linear_layers", "packed_quantization_config"]

# quantization_config["linear_class"] of bitdistill's extension of the bitnet format (docs/pack.md): plain
# transformers refuses the value in one line instead of loading a model that would compute something else.
EXTENSION_LINEAR_CLASS = "bitdistill"

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear-like module (nn.Linear, BitLinear, PackedBitLinear, Conv1D) by name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, PackedBitLinear)) or is_conv1d(m):
            out[name] = m
    return out


def check_packed_config(config: dict, path) -> dict:
    """The ``quantization_config`` of a packed folder's ``config.json`` (``path`` names it in errors).

    Raises:
        UserError: not a ``bitnet`` config, or a ``linear_class``/``quantization_mode`` this loader cannot read.
    """
    qc = config.get("quantization_config") or {}
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitnet":
        raise UserError(f"{path} is not a packed bitnet model (config.json has no bitnet quantization_config); "
                        "pack it first with bitdistill pack")
    if qc.get("linear_class", "bitlinear") not in ("bitlinear", EXTENSION_LINEAR_CLASS) or \
            qc.get("quantization_mode", "offline") != "offline":
        raise UserError(f"{path}: only linear_class='bitlinear' (or bitdistill's extension, '{EXTENSION_LINEAR_CLASS}'), "
                        f"quantization_mode='offline' is supported, got "
                        f"{qc.get('linear_class')!r}/{qc.get('quantization_mode')!r}")
    if qc.get("linear_class") == EXTENSION_LINEAR_CLASS and not isinstance(qc.get("rms_norm_modules", []), list):
        raise UserError(f"{path}: quantization_config.rms_norm_modules must be a list of module names")
    if not isinstance(qc.get("modules_to_not_convert", []), list):
        raise UserError(f"{path}: quantization_config.modules_to_not_convert must be a list of module names")
    return qc


def converted_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in linear_layers(model).items() if isinstance(m, (BitLinear, PackedBitLinear))}


def packed_quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` for ``model``'s packed checkpoint (``modules_to_not_convert`` never empty):
    the ``bitnet`` format's, or bitdistill's extension of it when only some converted layers carry an in-layer
    RMSNorm (SubLN), some are ``Conv1D`` layers, or the layers have per-row weight scales (see the module docstring).

    Raises:
        ValueError: in-layer RMSNorms with different eps values, the output head is converted,
            or transformers' pattern rule would not reproduce exactly this set of converted layers.
    """
    linears = linear_layers(model)
    converted = converted_layers(model)
    kept = sorted(n for n in linears if n not in converted)
    if not kept:
        raise UserError("every linear layer (the output head included) is converted; the bitnet format needs "
                        "the output head kept in floating point (an empty modules_to_not_convert makes "
                        "transformers convert lm_head)")
    for name in linears:
        if (name in converted) == any(matches_module_pattern(name, p) for p in kept):
            raise UserError(f"module {name!r} would be {'kept' if name in converted else 'converted'} by "
                            "transformers' modules_to_not_convert rule; rename or convert it consistently")
    norms = {(m.rms_norm is not None, m.rms_norm.variance_epsilon if m.rms_norm is not None else None)
             for m in converted.values()}
    qc = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
          "modules_to_not_convert": kept}
    conv1d = any(isinstance(m, BitConv1D) for m in converted.values())
    per_row = {bool(m.per_row) for m in converted.values()}
    if len(per_row) > 1:
        raise UserError("some converted layers have per-row weight scales and others one per tensor; convert the "
                        "whole student with one BitNetConfig.weight_scale")
    per_row = per_row.pop()
    if len(norms) == 1 and not conv1d and not per_row:
        (use_rms_norm, eps), = norms
        if use_rms_norm:
            qc.update(use_rms_norm=True, rms_norm_eps=float(eps))
        return qc
    eps = {e for normed, e in norms if normed}
    if len(eps) > 1:
        raise UserError(f"converted layers have in-layer RMSNorms with different eps values {sorted(eps)}; neither the "
                        "bitnet format nor bitdistill's extension of it holds more than one")
    normed = sorted(n for n, m in converted.items() if m.rms_norm is not None)
    qc.update(linear_class=EXTENSION_LINEAR_CLASS, rms_norm_modules=normed)
    if normed:
        qc["rms_norm_eps"] = float(next(iter(eps)))
    if per_row:
        qc["weight_scale"] = "row"
    return qc


def is_extension(qc: dict) -> bool:
    """Whether a ``quantization_config`` is bitdistill's extension of the bitnet format."""
    return qc.get("linear_class") == EXTENSION_LINEAR_CLASS
