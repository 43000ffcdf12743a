"""Write a SubLN student as transformers' own ``bitnet`` architecture (``BitNetForCausalLM``).

A SubLN student (:func:`bitdistill.insert_subln`) has an RMSNorm inside the BitLinear of every
attention output projection and MLP down projection only, which the ``bitnet`` quantization config
cannot express (its ``use_rms_norm`` is one switch for every layer). transformers' ``BitNetForCausalLM``
is Llama with exactly these two norms as modules of the model: ``self_attn.attn_sub_norm`` before
``o_proj`` and ``mlp.ffn_sub_norm`` before ``down_proj``, with the same RMSNorm arithmetic as
:class:`~bitdistill.nn.BitRMSNorm` (float32 normalization, cast back, then the weight). Its linear layers
are plain ``nn.Linear`` that the ``bitnet`` quantizer replaces, as in any other packed folder. So a SubLN
Llama / Mistral / Qwen2 student maps onto it tensor for tensor:

- every key keeps its name except ``<block>.self_attn.o_proj.rms_norm.weight`` ->
  ``<block>.self_attn.attn_sub_norm.weight`` and ``<block>.mlp.down_proj.rms_norm.weight`` ->
  ``<block>.mlp.ffn_sub_norm.weight``;
- ``hidden_act``, ``rms_norm_eps``, rotary parameters, vocabulary, tied embeddings and special tokens are
  copied; ``attention_bias`` covers q/k/v/o together, so Qwen2 (bias on q/k/v only) gets a zero ``o_proj`` bias;
- BitNet has one ``rms_norm_eps`` for every norm. When the SubLN eps ``e_s`` differs from the model's
  ``e_m``, the sub-norm inputs are scaled by ``a = sqrt(e_m / e_s)``, exactly: ``v_proj`` and ``up_proj``
  get ``weight_scale / a`` (and ``v_proj``'s bias ``* a``), which scales the attention output (linear in V)
  and the MLP product ``act(gate) * up`` by ``a``, and ``rmsnorm_{e_m}(a x) = rmsnorm_{e_s}(x)``.
  The ternary codes do not change; only those scales move, by one float32 rounding.

A fused projection (Phi-3's ``qkv_proj`` and ``gate_up_proj``) splits exactly into BitNet's separate ones:
its ternary codes are cut along the output rows and every part keeps the fused tensor's scale (one absmean
over the fused weight), so each part's codes and outputs are the fused layer's, bit for bit.

Which architectures map, and why the others do not, is the ``bitnet`` field of the architecture table
(:data:`bitdistill.nn.arch.SUPPORTED_ARCHITECTURES`); the others are refused with that reason (their
students pack as the documented extension of the format instead, :mod:`bitdistill.export.format`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from bitdistill.errors import UserError
from bitdistill.nn.arch import SUPPORTED_ARCHITECTURES
from bitdistill.nn.bitlinear import BitLinear
from bitdistill.nn.packed import PackedBitLinear
from bitdistill.nn.replace import student_marker
from bitdistill.quant.packing import pack_ternary
from bitdistill.quant.reference import weight_quant

__all__ = ["MAPPABLE_ARCHITECTURES", "bitnet_arch_config", "bitnet_unmappable", "has_subln", "packs_as_bitnet", "split_fused", "subln_to_bitnet"]

MAPPABLE_ARCHITECTURES = tuple(t for t, spec in SUPPORTED_ARCHITECTURES.items() if spec.bitnet is None)
# fused student projection -> BitNet's separate ones (their output rows in order)
_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
_SUBLN_RENAMES = {"self_attn.o_proj": "self_attn.attn_sub_norm", "mlp.down_proj": "mlp.ffn_sub_norm"}
_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
                "rope_theta", "rope_scaling")


def has_subln(model: nn.Module) -> bool:
    """Whether ``model`` is a SubLN student (its marker lists SubLN modules)."""
    return bool((student_marker(model) or {}).get("subln_modules"))


def packs_as_bitnet(model: nn.Module) -> bool:
    """Whether ``bitdistill pack`` writes ``model`` as ``BitNetForCausalLM``: a SubLN student that maps exactly, with
    one weight scale per tensor (transformers' bitnet loader holds no per-row scales: those go to the extension)."""
    return (has_subln(model) and bitnet_unmappable(model.config) is None
            and not any(getattr(m, "per_row", False) for m in model.modules()))


def _refuse(model_type: str, why: str) -> UserError:
    return UserError(f"cannot write this SubLN {model_type} student as transformers' BitNetForCausalLM: {why}")


def bitnet_unmappable(config) -> str | None:
    """Why a SubLN student of ``config`` (a transformers config or ``config.json`` dict) has no exact
    ``BitNetForCausalLM`` counterpart; ``None`` when it has one."""
    d = config if isinstance(config, dict) else config.to_dict()
    model_type = d.get("model_type")
    spec = SUPPORTED_ARCHITECTURES.get(model_type)
    if spec is None:
        return "its architecture is not in bitdistill's table"
    if spec.bitnet is not None:
        return spec.bitnet
    heads, hidden = d["num_attention_heads"], d["hidden_size"]
    head_dim = d.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        return (f"num_attention_heads * head_dim = {heads * head_dim} differs from hidden_size {hidden} (BitNet's "
                "attn_sub_norm is hidden_size wide)")
    if d.get("mlp_bias"):
        return "its MLP has biases (mlp_bias); BitNet's MLP has none"
    window = d.get("sliding_window")
    if d.get("use_sliding_window", True) and window is not None and window < d["max_position_embeddings"]:
        return f"it uses sliding-window attention ({window} tokens); BitNet attends to all"
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        return "it rotates part of each head (partial_rotary_factor); BitNet rotates all of it"
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"its RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not copied to BitNet here"
    return None


def bitnet_arch_config(config):
    """The ``BitNetConfig`` of a Llama-like ``config``; ``ValueError`` naming what BitNet cannot express."""
    from transformers import BitNetConfig

    d = config.to_dict()
    model_type = d.get("model_type")
    why = bitnet_unmappable(d)
    if why is not None:
        raise _refuse(str(model_type), why)
    kw = {k: d[k] for k in _CONFIG_KEYS if k in d}
    kw["attention_bias"] = bool(d.get("attention_bias", model_type == "qwen2"))
    if "rope_parameters" in kw:  # BitNet's rotary reads rope_theta/rope_type only
        kw["rope_parameters"] = {k: v for k, v in kw["rope_parameters"].items() if k != "partial_rotary_factor"}
    cfg = BitNetConfig(**kw)
    cfg.architectures = ["BitNetForCausalLM"]
    return cfg


def _bitnet_name(name: str) -> str:
    """Student key -> BitNetForCausalLM key (only the SubLN norm weights move)."""
    for proj, norm in _SUBLN_RENAMES.items():
        prefix = f".{proj}.rms_norm."
        if prefix in name:
            return name.replace(prefix, f".{norm}.")
    return name


def _plain_packed(layer: BitLinear, bias: bool) -> PackedBitLinear:
    """``layer`` packed without its in-layer norm (the norm becomes a BitNet sub-norm module)."""
    full = PackedBitLinear.from_bitlinear(layer)
    out = PackedBitLinear(layer.in_features, layer.out_features, bias=bias, per_row=layer.per_row,
                          device=full.weight.device, dtype=layer.weight.dtype)
    out.weight.copy_(full.weight)
    out.weight_scale.copy_(full.weight_scale)
    if layer.bias is not None:
        out.bias.copy_(layer.bias.detach())
    elif bias:
        out.bias.zero_()
    return out


@torch.no_grad()
def split_fused(layer: BitLinear, sizes: list[int]) -> list[PackedBitLinear]:
    """A fused BitLinear (``[sum(sizes), in]``) as packed layers of ``sizes`` output rows, exactly.

    The parts take the fused codes row for row and every part keeps the fused scale (per tensor: one absmean over
    the fused weight; per row: its rows' scales): each part's output is the fused output's slice, bit for bit. No
    bias, no in-layer norm (Phi-3's).
    """
    if layer.bias is not None or layer.rms_norm is not None:
        raise ValueError("split_fused expects a fused projection without bias or in-layer norm")
    codes, gamma = weight_quant(layer.weight_out_in().detach(), layer.per_row)
    scales = (1.0 / gamma).reshape(-1)
    parts = []
    for rows, part_scales in zip(codes.split(sizes, dim=0),
                                 scales.split(sizes) if layer.per_row else [scales] * len(sizes), strict=True):
        part = PackedBitLinear(layer.in_features, rows.shape[0], bias=False, per_row=layer.per_row,
                               device=codes.device, dtype=layer.weight.dtype)
        part.weight.copy_(pack_ternary(rows))
        part.weight_scale.copy_(part_scales)
        parts.append(part)
    return parts


def _fused_sizes(config, fused: str) -> list[int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if fused.endswith("qkv_proj"):
        return [heads * head_dim, kv * head_dim, kv * head_dim]
    return [config.intermediate_size, config.intermediate_size]


@torch.no_grad()
def subln_to_bitnet(student: nn.Module) -> nn.Module:
    """A ``BitNetForCausalLM`` with :class:`PackedBitLinear` layers computing the SubLN ``student``'s function.

    Args:
        student: a SubLN BitNet student of an architecture the table maps (Llama, Mistral, Qwen2, Phi-3; see
            :func:`has_subln`). Not modified.

    Returns:
        The packed BitNet model in eval mode on the student's device, ready for :func:`bitdistill.save_packed`
        (its folder loads in plain transformers as ``BitNetForCausalLM``). Logits equal the student's up to
        float32 rounding.

    Raises:
        ValueError: the student has no SubLN, or its architecture / options cannot be expressed (one line).
    """
    from transformers import AutoModelForCausalLM

    marker = student_marker(student) or {}
    subln = set(marker.get("subln_modules") or ())
    if not subln:
        raise ValueError("subln_to_bitnet expects a SubLN student (no subln_modules in its bitdistill marker)")
    config = bitnet_arch_config(student.config)
    model_type = student.config.model_type
    converted = {n: m for n, m in student.named_modules() if isinstance(m, BitLinear)}
    expected = {n for n in converted if n.endswith(tuple(f".{p}" for p in _SUBLN_RENAMES))}
    if subln != expected:
        raise _refuse(model_type, "its SubLN norms are not on every block's o_proj and down_proj")
    odd = sorted(n for n, m in converted.items() if (m.rms_norm is not None) != (n in subln))
    if odd:
        raise _refuse(model_type, f"{odd[0]} has an in-layer RMSNorm outside SubLN")
    subln_eps = {converted[n].rms_norm.variance_epsilon for n in subln}
    if len(subln_eps) != 1:
        raise _refuse(model_type, "its SubLN norms have different eps values")
    dtype = next(iter(converted.values())).weight.dtype
    bitnet = AutoModelForCausalLM.from_config(config, dtype=dtype)
    wanted_bias = config.attention_bias
    for name, layer in list(converted.items()):
        local = next((f for f in _FUSED if name.endswith("." + f)), None)
        if local is not None:
            prefix = name[: -len(local)]
            for part_name, part in zip(_FUSED[local], split_fused(layer, _fused_sizes(student.config, local)),
                                       strict=True):
                target = bitnet.get_submodule(prefix + part_name)
                if (target.in_features, target.out_features) != (part.in_features, part.out_features):
                    raise _refuse(model_type, f"{name} does not split into BitNetForCausalLM's {part_name}")
                bitnet.set_submodule(prefix + part_name, part)
            continue
        target = bitnet.get_submodule(name)
        if not isinstance(target, nn.Linear) or (target.in_features, target.out_features) != (
                layer.in_features, layer.out_features):
            raise _refuse(model_type, f"{name} has no same-shaped counterpart in BitNetForCausalLM")
        bias = target.bias is not None
        if layer.bias is not None and not bias:
            raise _refuse(model_type, f"{name} has a bias that BitNetForCausalLM lacks")
        bitnet.set_submodule(name, _plain_packed(layer, bias=bias and wanted_bias))
    state = {}
    for key, t in student.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner not in converted and not (owner.endswith(".rms_norm") and owner[: -len(".rms_norm")] in subln):
            state[key] = t
        elif owner.endswith(".rms_norm"):
            state[_bitnet_name(key)] = t
    result = bitnet.load_state_dict(state, strict=False)
    split = {name[: -len(local)] + p for name in converted
             for local in _FUSED if name.endswith("." + local) for p in _FUSED[local]}
    packed_keys = {k for k in bitnet.state_dict() if k.rpartition(".")[0] in set(converted) | split}
    missing = sorted(set(result.missing_keys) - packed_keys)
    if missing or result.unexpected_keys:
        raise _refuse(model_type, f"its tensors do not match BitNetForCausalLM (missing {missing[:2]}, unexpected "
                                  f"{sorted(result.unexpected_keys)[:2]})")
    alpha = math.sqrt(config.rms_norm_eps / next(iter(subln_eps)))
    if alpha != 1.0:
        for block in sorted({name.rsplit(".", 2)[0] for name in subln}):
            for proj in ("self_attn.v_proj", "mlp.up_proj"):
                layer = bitnet.get_submodule(f"{block}.{proj}")
                layer.weight_scale.div_(alpha)
                if layer.bias is not None:
                    layer.bias.mul_(alpha)
    bitnet.generation_config = copy.deepcopy(student.generation_config)
    return bitnet.to(next(student.parameters()).device).eval()
