"""The Hugging Face ``bitnet`` packed format: what a packed folder holds, and which layers a model packs.

The format (DESIGN.md "Packed format"): every converted linear layer ``<m>`` is stored as
``<m>.weight`` ``uint8 [out/4, in]`` (2-bit codes, :mod:`bitdistill.quant.packing`) and
``<m>.weight_scale`` float32 ``[1]`` = ``1 / gamma``; biases, in-layer RMSNorm weights and every
other tensor stay floating point; ``config.json`` carries ``quantization_config`` =
``{"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
"modules_to_not_convert": [...]}``. Plain ``transformers.AutoModelForCausalLM.from_pretrained``
loads it; :func:`bitdistill.export.loader.load_packed` loads it with :class:`bitdistill.nn.PackedBitLinear`
layers; :func:`bitdistill.export.writer.save_packed` writes it.
"""

from __future__ import annotations

from torch import nn

from bitdistill.errors import UserError
from bitdistill.nn.arch import is_conv1d
from bitdistill.nn.bitlinear import BitLinear
from bitdistill.nn.config import is_packed_config
from bitdistill.nn.packed import PackedBitLinear
from bitdistill.nn.replace import matches_module_pattern

__all__ = ["COPY_FILES", "DEFAULT_MAX_SHARD_BYTES", "check_packed_config", "converted_layers", "is_packed_config",
           "linear_layers", "packed_quantization_config"]

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
    if qc.get("linear_class", "bitlinear") != "bitlinear" or qc.get("quantization_mode", "offline") != "offline":
        raise UserError(f"{path}: only linear_class='bitlinear', quantization_mode='offline' is supported, got "
                        f"{qc.get('linear_class')!r}/{qc.get('quantization_mode')!r}")
    if not isinstance(qc.get("modules_to_not_convert", []), list):
        raise UserError(f"{path}: quantization_config.modules_to_not_convert must be a list of module names")
    return qc


def converted_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in linear_layers(model).items() if isinstance(m, (BitLinear, PackedBitLinear))}


def packed_quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` for ``model``'s packed checkpoint (``modules_to_not_convert`` never empty).

    Raises:
        ValueError: the converted layers disagree on the in-layer RMSNorm, the output head is converted,
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
    if len(norms) != 1:
        raise UserError("converted layers disagree on the in-layer RMSNorm (use_rms_norm / eps), e.g. a SubLN "
                        "student (norms before o_proj/down_proj only); the bitnet format has one setting for "
                        "all layers (a SubLN student packs as BitNetForCausalLM: bitdistill pack, or "
                        "bitdistill.export.bitnet_arch.subln_to_bitnet before save_packed)")
    (use_rms_norm, eps), = norms
    qc = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
          "modules_to_not_convert": kept}
    if use_rms_norm:
        qc.update(use_rms_norm=True, rms_norm_eps=float(eps))
    return qc
