"""The architecture table: what every feature needs to know about a decoder family, in one place.

One :class:`ArchSpec` per ``config.model_type`` says where a block keeps its projections and what each
feature can do with it: SubLN (:mod:`bitdistill.nn.subln`), the attention-relation loss
(:mod:`bitdistill.distill.attention`), block discovery (:func:`decoder_layers`, :func:`find_blocks`: recovery,
self-distillation exits), the fast decoder (:mod:`bitdistill.nn.fast_decode`), the GGUF export
(:mod:`bitdistill.export.gguf`) and the plain-transformers ``BitNetForCausalLM`` mapping of SubLN students
(:mod:`bitdistill.export.bitnet_arch`). Adding a decoder family is one entry in :data:`SUPPORTED_ARCHITECTURES`.

An architecture not in the table but with the common block layout (``self_attn.{q,k,v,o}_proj`` and
``mlp.down_proj`` in every block of the model's block list) works by discovery (:func:`lookup`): SubLN and the
attention relation apply; the fast decoder, GGUF and the ``BitNetForCausalLM`` mapping do not.

Module names are relative to one decoder block. A ``reason`` field is ``None`` where the feature applies and
otherwise the one-line reason it does not (the text every refusal and skip note quotes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from bitdistill.errors import UserError

__all__ = ["RECIPE_PARTS", "SUPPORTED_ARCHITECTURES", "ArchSpec", "RecipePlan", "arch_spec", "decoder_layers",
           "fast_decode_unsupported", "find_blocks", "is_conv1d", "lookup", "resolve_recipe_parts"]


@dataclass(frozen=True)
class ArchSpec:
    """What one decoder family keeps where, and which features apply to it.

    Attributes:
        qkv: ``(q, k, v)`` projection names, or a single fused projection name.
        attn_out: the attention output projection (SubLN goes before it).
        mlp_out: the MLP down projection (SubLN goes before it).
        mlp_in: the MLP input projections (``(gate, up)``, a fused ``(gate_up,)`` or ``(up,)``).
        final_norm: the final norm's module name in the causal LM (the exits' shared norm).
        qkv_per_head: a fused ``qkv`` output laid out ``[heads, 3, head_dim]`` (GPT-NeoX) instead of ``[q; k; v]``.
        qk_norm: the attention has per-head ``q_norm``/``k_norm`` (Qwen3, Gemma 3, OLMo 2).
        subln: ``None`` where SubLN can go before ``attn_out`` and ``mlp_out``, else why not.
        attention: ``None`` where the attention-relation loss can read Q/K/V, else why not.
        fast_decode: the fast decoder (:class:`bitdistill.nn.fast_decode.FastDecoder`) runs it.
        gguf: llama.cpp's architecture name for a student without SubLN (``None``: no GGUF mapping here). A fused
            ``qkv_per_head`` projection is written as llama.cpp's ``[q; k; v]`` rows and ``conv1d`` weights as
            ``[out, in]`` (both reorder a tensor only, so a fused ternary layer keeps its one scale).
        gguf_permute_qk: llama.cpp's graph uses interleaved RoPE, so q/k rows are permuted on export.
        bitnet: ``None`` where a SubLN student maps exactly onto transformers' ``BitNetForCausalLM``, else why not.
        conv1d: its projections are transformers ``Conv1D`` layers (``weight [in, out]``; GPT-2).
        discovered: built by :func:`lookup` from the block layout (the architecture is not in the table).
    """

    qkv: tuple[str, ...]
    attn_out: str | None
    mlp_out: str | None
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    final_norm: str = "model.norm"
    qkv_per_head: bool = False
    qk_norm: bool = False
    subln: str | None = None
    attention: str | None = None
    fast_decode: bool = False
    gguf: str | None = None
    gguf_permute_qk: bool = False
    bitnet: str | None = None
    conv1d: bool = False
    discovered: bool = False


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA = ArchSpec(_QKV, "self_attn.o_proj", "mlp.down_proj", fast_decode=True)
_OTHER = ArchSpec(_QKV, "self_attn.o_proj", "mlp.down_proj")  # a Llama-like block, nothing but the common features

SUPPORTED_ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": replace(_LLAMA, gguf="llama", gguf_permute_qk=True),
    "mistral": replace(_LLAMA, gguf="llama", gguf_permute_qk=True),
    "qwen2": replace(_LLAMA, gguf="qwen2"),
    "qwen3": replace(_LLAMA, qk_norm=True, gguf="qwen3",
                     bitnet="its per-head q_norm/k_norm have no counterpart in BitNetForCausalLM"),
    "phi3": replace(_LLAMA, qkv=("self_attn.qkv_proj",), mlp_in=("mlp.gate_up_proj",), gguf="phi3"),
    "bitnet": replace(_LLAMA, gguf="bitnet", bitnet="it is BitNetForCausalLM already"),
    "gemma": replace(_OTHER, bitnet="its (1 + weight) RMSNorms, scaled embedding and GELU MLP are not BitNet's"),
    "gemma2": replace(_OTHER, bitnet="its extra feed-forward norms, logit soft-capping and GELU MLP are not BitNet's"),
    "gemma3_text": replace(_OTHER, qk_norm=True,
                           bitnet="its q/k norms, extra feed-forward norms and GELU MLP are not BitNet's"),
    "olmo": replace(_OTHER, bitnet="its parameter-free LayerNorms are not BitNet's RMSNorms"),
    "olmo2": replace(_OTHER, qk_norm=True, bitnet="its q/k norms and post-block norms are not BitNet's layout"),
    "granite": replace(_OTHER, bitnet="its embedding, residual, attention and logit multipliers are not BitNet's"),
    "stablelm": replace(_OTHER, bitnet="it uses LayerNorm with bias and partial rotary embeddings"),
    "gpt_neox": ArchSpec(("attention.query_key_value",), "attention.dense", "mlp.dense_4h_to_h",
                         mlp_in=("mlp.dense_h_to_4h",), final_norm="gpt_neox.final_layer_norm", qkv_per_head=True,
                         subln="SubLN is defined for RMSNorm decoders (o_proj/down_proj); GPT-NeoX has LayerNorm "
                               "blocks with a parallel residual",
                         gguf="gptneox",
                         bitnet="it uses LayerNorm with bias, a parallel residual and partial rotary embeddings"),
    "gpt2": ArchSpec(("attn.c_attn",), "attn.c_proj", "mlp.c_proj", mlp_in=("mlp.c_fc",),
                     final_norm="transformer.ln_f", conv1d=True, gguf="gpt2",
                     subln="SubLN is defined for RMSNorm decoders (o_proj/down_proj); GPT-2 has LayerNorm blocks "
                           "of Conv1D projections",
                     bitnet="it uses LayerNorm with bias, learned positions and Conv1D projections"),
}
_NO_SUBLN = "no attention output projection (self_attn.o_proj) and MLP down projection (mlp.down_proj) in its blocks"
_NO_QKV = "no q/k/v projections (self_attn.{q,k,v}_proj) in its blocks"
_UNKNOWN = "it is not in bitdistill's table and its blocks lack self_attn.{q,k,v,o}_proj and mlp.down_proj"
_DISCOVERED_BITNET = "its architecture is not in bitdistill's table (found by its block layout only)"


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (GPT-2's linear layer, ``weight [in, out]``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _model_type(model_or_config) -> str | None:
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(config, dict):
        return config.get("model_type")
    return getattr(config, "model_type", None)


def decoder_layers(model: nn.Module, fix: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(name, layers)``: the model's decoder-block list, found without naming an architecture: the
    ``nn.ModuleList`` of ``config.num_hidden_layers`` modules (the largest such list by parameter count).

    Raises:
        UserError: there is no such list (one line naming the model, and ``fix`` when given).
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and n is not None and len(m) == n and n > 0]
    if not found:
        raise UserError(f"cannot find the decoder blocks of {type(model).__name__}: it has no nn.ModuleList of "
                        f"config.num_hidden_layers={n} layers{f'; {fix}' if fix else ''}")
    return max(found, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
    except AttributeError:
        return False
    return True


def lookup(model_or_config) -> ArchSpec | None:
    """The :class:`ArchSpec` of a model (or config): its table entry, else one discovered from its blocks.

    Args:
        model_or_config: a causal LM, a transformers config or a ``config.json`` dict. A config of an architecture
            outside the table is built on the meta device (no memory) to look at its blocks.

    Returns:
        The entry for ``config.model_type``; for another architecture whose every block has
        ``self_attn.{q,k,v,o}_proj`` and ``mlp.down_proj``, a discovered entry (SubLN and the attention relation
        only); ``None`` when neither.
    """
    model_type = _model_type(model_or_config)
    if model_type in SUPPORTED_ARCHITECTURES:
        return SUPPORTED_ARCHITECTURES[model_type]
    model = model_or_config if isinstance(model_or_config, nn.Module) else _meta_model(model_or_config)
    if model is None:
        return None
    try:
        _, blocks = decoder_layers(model)
    except UserError:
        return None
    block = blocks[0]
    qkv = _QKV if all(_has(block, n) for n in _QKV) else ()
    outs = ("self_attn.o_proj", "mlp.down_proj")
    has_out = all(_has(block, n) for n in outs)
    if not qkv and not has_out:
        return None
    mlp_in = tuple(n for n in ("mlp.gate_proj", "mlp.up_proj") if _has(block, n))
    final = next((f"{p}.{n}" for p in ("model",) for n in ("norm", "final_layernorm", "final_norm")
                  if _has(model, f"{p}.{n}")), "model.norm")
    return ArchSpec(qkv or _QKV, *(outs if has_out else (None, None)), mlp_in=mlp_in, final_norm=final,
                    qk_norm=_has(block, "self_attn.q_norm"), subln=None if has_out else _NO_SUBLN,
                    attention=None if qkv else _NO_QKV, bitnet=_DISCOVERED_BITNET, discovered=True)


def _meta_model(config):
    """A model built from ``config`` on the meta device, or ``None`` when transformers cannot build one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    try:
        if isinstance(config, dict):
            config = AutoConfig.for_model(**config)
        if not isinstance(config, PretrainedConfig):
            return None
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError):
        return None


def arch_spec(model: nn.Module, feature: str, fix: str | None = None, *, needs: str | None = None) -> ArchSpec:
    """The :class:`ArchSpec` of ``model`` (:func:`lookup`), checked for ``feature``.

    Args:
        model: the causal LM.
        feature: what needs it, for the error.
        fix: how to do without it, for the error.
        needs: the :class:`ArchSpec` reason field ``feature`` needs (``"subln"``, ``"attention"``): an entry whose
            field holds a reason is refused with it.

    Raises:
        UserError: the architecture is neither in the table nor discoverable, or ``needs`` does not apply (one line).
    """
    spec = lookup(model)
    model_type = _model_type(model)
    tail = f"; {fix}" if fix else ""
    if spec is None:
        raise UserError(f"{feature} does not support architecture {model_type!r}: it is not in bitdistill's table "
                        f"({', '.join(SUPPORTED_ARCHITECTURES)}) and its blocks have neither self_attn.{{q,k,v,o}}_proj "
                        f"nor mlp.down_proj{tail}")
    why = getattr(spec, needs) if needs else None
    if why:
        raise UserError(f"{feature} does not apply to {model_type!r}: {why}{tail}")
    return spec


def fast_decode_unsupported(model_or_config) -> str | None:
    """Why :class:`bitdistill.nn.fast_decode.FastDecoder` cannot run this model (``None``: it can): the table's
    ``fast_decode`` field, one line a caller prints before falling back to the model's own ``generate``."""
    model_type = _model_type(model_or_config)
    spec = SUPPORTED_ARCHITECTURES.get(model_type)
    if spec is None or not spec.fast_decode:
        fast = ", ".join(t for t, s in SUPPORTED_ARCHITECTURES.items() if s.fast_decode)
        return f"the fast decoder runs {fast}, not {model_type!r}"
    config = getattr(model_or_config, "config", model_or_config)
    window = config.get("sliding_window") if isinstance(config, dict) else getattr(config, "sliding_window", None)
    if window and model_type != "qwen2":
        return f"the fast decoder has no sliding window (sliding_window={window})"
    return None


def find_blocks(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """The transformer blocks and the final norm of a causal LM (:func:`decoder_layers` and the table's
    ``final_norm``).

    Raises:
        UserError: the blocks or the final norm cannot be found (one line).
    """
    _, blocks = decoder_layers(model)
    spec = lookup(model)
    candidates = [spec.final_norm] if spec is not None else []
    candidates += ["model.norm", "gpt_neox.final_layer_norm", "transformer.ln_f"]
    for name in candidates:
        if _has(model, name) and isinstance(model.get_submodule(name), nn.Module):
            return blocks, model.get_submodule(name)
    raise UserError(f"cannot find the final norm of {type(model).__name__} (looked for {', '.join(candidates)}); add "
                    "its architecture to bitdistill.nn.arch.SUPPORTED_ARCHITECTURES")


# recipe part -> (its name in messages, the flag that asks for it, the ArchSpec reason field it needs)
RECIPE_PARTS: dict[str, tuple[str, str, str | None]] = {
    "subln": ("SubLN", "--subln", "subln"),
    "attention": ("the attention-relation loss", "--attention_weight", "attention"),
    "hidden": ("the hidden-state loss", "--hidden_weight", None),
}


@dataclass(frozen=True)
class RecipePlan:
    """Which parts of the distillation recipe a model takes (:func:`resolve_recipe_parts`).

    Attributes:
        architecture: the model's ``model_type``.
        applied: the parts that run.
        skipped: ``{part: reason}`` for each default part the architecture cannot take.
    """

    architecture: str
    applied: tuple[str, ...]
    skipped: dict[str, str]

    def line(self) -> str | None:
        """One line naming the skipped default parts and why (``None`` when nothing was skipped)."""
        if not self.skipped:
            return None
        parts = "; ".join(f"{RECIPE_PARTS[p][0]} ({RECIPE_PARTS[p][1]}): {why}" for p, why in self.skipped.items())
        return f"recipe parts skipped for {self.architecture}: {parts}"


def resolve_recipe_parts(model_or_config, requested: dict[str, bool | None]) -> RecipePlan:
    """Decide which recipe parts apply to a model, before any work.

    Args:
        model_or_config: the model (or its config / ``config.json`` dict) the parts act on.
        requested: ``{part: how}`` for parts of :data:`RECIPE_PARTS`: ``True`` asked for explicitly, ``None`` on
            as the recipe's default, ``False`` off.

    Returns:
        A :class:`RecipePlan`: a default part the architecture cannot take is skipped with its reason.

    Raises:
        UserError: a part asked for explicitly cannot apply (one line naming the flag, the architecture, the
            reason and the fix), or an unknown part.
    """
    unknown = sorted(set(requested) - set(RECIPE_PARTS))
    if unknown:
        raise ValueError(f"unknown recipe parts {unknown}; known: {', '.join(RECIPE_PARTS)}")
    model_type = str(_model_type(model_or_config))
    spec = lookup(model_or_config) if any(v is not False for v in requested.values()) else None
    applied, skipped = [], {}
    for part, how in requested.items():
        if how is False:
            continue
        name, flag, field = RECIPE_PARTS[part]
        why = None
        if field is not None:
            why = _UNKNOWN if spec is None else getattr(spec, field)
        if why is None:
            applied.append(part)
        elif how is None:
            skipped[part] = why
        else:
            raise UserError(f"{flag} asks for {name}, which does not apply to {model_type!r}: {why}; drop {flag} "
                            "(or set it off)")
    return RecipePlan(model_type, tuple(applied), skipped)
