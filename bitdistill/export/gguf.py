"""Write a BitNet student as one GGUF file that llama.cpp runs unchanged.

Everything binary goes through the ``gguf`` package (llama.cpp's own Python writer): ``GGUFWriter``, the
architecture tensor-name maps and the ``TQ2_0`` / ``TQ1_0`` / ``Q8_0`` quantizers. A ternary layer with
codes ``T`` and per-tensor scale ``gamma`` is handed to the quantizer as exactly ``T * gamma``: every
256-wide block's absmax is ``gamma`` (or 0 for an all-zero block), so the written codes are exactly ``T``
and each block's scale is ``gamma`` rounded to float16 (the block-scale type of both formats). A per-row
student (``BitNetConfig(weight_scale="row")``) is handed over as ``T_r * gamma_r``: a block lies inside one row,
so it gets its row's scale the same way.

llama.cpp's ternary types need rows (``in_features``) that are a multiple of 256. Other ternary layers
go out as ``Q8_0`` of ``T * gamma`` (32-wide blocks of int8 ``±127`` / 0 with a float16 scale: the same
ternary function, 8.5 bits per weight) unless ``strict``, which refuses them. The report lists what each
layer became and the share of ternary weights that stayed ternary in the file.

Architectures: ``llama`` and ``mistral`` (llama.cpp ``llama``; q/k rows permuted for its interleaved RoPE),
``qwen2``, ``qwen3``, ``phi3`` (fused ``qkv_proj`` / ``gate_up_proj``), ``gpt_neox`` (llama.cpp ``gptneox``; the
per-head fused ``query_key_value`` rows reordered to ``[q; k; v]``) and ``gpt2`` (``Conv1D`` weights transposed):
the ``gguf`` field of the architecture table (:data:`bitdistill.nn.arch.SUPPORTED_ARCHITECTURES`), with
:func:`gguf_graph_unsupported` for what a config can add that the graph lacks. A SubLN student (norms before ``o_proj`` and
``down_proj``) goes out as llama.cpp's ``bitnet`` graph, the only one with those norms, through its exact
``BitNetForCausalLM`` form (:func:`bitdistill.export.bitnet_arch.subln_to_bitnet`: Llama, Mistral, Phi-3 split
exactly, a SubLN eps unlike ``rms_norm_eps`` folded into scales) when the graphs match
(:func:`bitnet_graph_unsupported`: tied embeddings, no biases, SiLU). Tokenizer: byte-level BPE (``tokenizer.json``) with a pre-tokenizer llama.cpp
knows (:data:`PRE_TOKENIZERS`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bitdistill.errors import UserError
from bitdistill.io import atomic_write
from bitdistill.nn.arch import SUPPORTED_ARCHITECTURES, ArchSpec, is_conv1d, lookup
from bitdistill.nn.bitlinear import BitLinear
from bitdistill.nn.packed import PackedBitLinear
from bitdistill.quant.packing import unpack_ternary
from bitdistill.quant.reference import weight_quant

__all__ = ["GGUF_ARCHITECTURES", "GGUF_TYPES", "PRE_TOKENIZERS", "GGUFLayer", "GGUFReport", "bitnet_graph_unsupported",
           "gguf_graph_unsupported", "pack_gguf", "require_gguf", "save_gguf"]

GGUF_TYPES = ("tq2_0", "tq1_0")
GGUF_ARCHITECTURES = tuple(t for t, spec in SUPPORTED_ARCHITECTURES.items() if spec.gguf and t != "bitnet")
BLOCK = 256  # QK_K: the block width of llama.cpp's ternary types
# The activations llama.cpp's gpt2 and gptneox graphs can stand for: both call build_ffn(..., LLM_FFN_GELU, ...),
# which is ggml_gelu (the tanh approximation; HF "gelu" is erf GELU, within 5e-4 of it, as in llama.cpp's own
# conversion of GPT-NeoX models).
_GELU = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")

# llama.cpp pre-tokenizer name -> the Hugging Face ``pre_tokenizer`` (tokenizer.json) it reproduces.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt-2": [_BYTE_LEVEL],
    "smollm": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
    "llama-bpe": [{"type": "Split", "regex": _LLAMA3_REGEX}, {"type": "ByteLevel", "use_regex": False}],
    "qwen2": [{"type": "Split", "regex": _QWEN2_REGEX}, {"type": "ByteLevel", "use_regex": False}],
}

# SubLN norm weights -> the names gguf's bitnet tensor map knows: a SubLN student's in-layer norms, and the
# sub-norm modules of transformers' BitNetForCausalLM (what `bitdistill pack` writes for a SubLN student).
_SUBLN_RENAME = {"self_attn.o_proj.rms_norm": "self_attn.inner_attn_ln", "mlp.down_proj.rms_norm": "mlp.ffn_layernorm",
                 "self_attn.attn_sub_norm": "self_attn.inner_attn_ln", "mlp.ffn_sub_norm": "mlp.ffn_layernorm"}


def require_gguf():
    """Import the ``gguf`` package, or fail with one line naming the extra."""
    try:
        import gguf
    except ImportError as exc:
        raise UserError("the GGUF export needs the gguf package: pip install 'bitdistill[gguf]'") from exc
    return gguf


@dataclass
class GGUFLayer:
    """One linear layer in the GGUF file: its module, tensor name, written type and why."""

    module: str
    tensor: str
    shape: tuple[int, int]
    qtype: str
    reason: str


@dataclass
class GGUFReport:
    """What :func:`save_gguf` wrote.

    Attributes:
        arch: the llama.cpp architecture name.
        gguf_type: the ternary type (``tq2_0`` / ``tq1_0``).
        layers: every converted linear layer with its written type.
        ternary_weights: weights of all converted layers.
        ternary_in_file: weights written as a llama.cpp ternary type.
        file_bytes: size of the written file.
        path: the file.
    """

    arch: str
    gguf_type: str
    layers: list[GGUFLayer] = field(default_factory=list)
    ternary_weights: int = 0
    ternary_in_file: int = 0
    file_bytes: int = 0
    path: str = ""

    @property
    def ternary_share(self) -> float:
        """Fraction of the converted layers' weights stored as a llama.cpp ternary type."""
        return self.ternary_in_file / max(self.ternary_weights, 1)

    def __str__(self) -> str:
        lines = [f"  {layer.module} -> {layer.tensor} [{layer.shape[0]}x{layer.shape[1]}] {layer.qtype}"
                 + (f" ({layer.reason})" if layer.reason else "") for layer in self.layers]
        n_tern = sum(layer.qtype == self.gguf_type.upper() for layer in self.layers)
        lines.append(f"llama.cpp arch {self.arch}: {n_tern} of {len(self.layers)} ternary layers as "
                     f"{self.gguf_type.upper()}, {self.ternary_share:.1%} of ternary weights stay ternary; "
                     f"{self.file_bytes / 2**20:.2f} MiB written to {self.path}")
        return "\n".join(lines)


def _ternary(name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [out, in], gamma float32 [] or [out, 1])`` of a converted layer (``[out, 1]``: per-row scales,
    which every block of a row takes, so the file holds them exactly as it holds a per-tensor one)."""
    if isinstance(module, PackedBitLinear):
        gamma = 1.0 / module.weight_scale.float()
        return unpack_ternary(module.weight, torch.int8), gamma.reshape(-1, 1) if module.per_row else gamma.reshape(())
    w = module.weight_out_in().detach()
    if not torch.isfinite(w).all():
        raise UserError(f"cannot export {name!r}: its weight contains NaN or Inf; fix the checkpoint first")
    codes, gamma = weight_quant(w, module.per_row)
    return codes.to(torch.int8), gamma.float().reshape(-1, 1) if module.per_row else gamma.float().reshape(())


def _converted(model: nn.Module) -> dict[str, nn.Module]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (BitLinear, PackedBitLinear)):
            out[name] = m
    if not out:
        raise UserError(f"{type(model).__name__} has no BitLinear layer; convert and train a student first")
    return out


def _norm_layout(model: nn.Module, converted: dict[str, nn.Module]) -> bool:
    """Whether ``model`` is a SubLN student; raises on in-layer norms llama.cpp cannot express."""
    normed = {n for n, m in converted.items() if m.rms_norm is not None}
    if not normed:
        return False
    spec = lookup(model)
    outs = (spec.attn_out, spec.mlp_out) if spec is not None and spec.subln is None else ("o_proj", "down_proj")
    subln = {n for n in converted if n.endswith(outs)}
    if normed != subln:
        raise UserError("the student has an in-layer RMSNorm in BitLinear layers other than o_proj/down_proj "
                         "(use_rms_norm): no llama.cpp graph has those norms; export a student without them")
    return True


def bitnet_graph_unsupported(cfg) -> str | None:
    """Why llama.cpp's ``bitnet`` graph cannot run a ``BitNetForCausalLM`` of config ``cfg`` exactly (``None``: it
    can): a Llama block with SubLN, one eps, no biases, SiLU gating and the token embedding as output head."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if not getattr(cfg, "tie_word_embeddings", False):
        return "llama.cpp's bitnet graph uses the token embedding as output head (tie_word_embeddings)"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "llama.cpp's bitnet graph has no q/k/v/mlp biases"
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        return "llama.cpp's bitnet graph needs num_attention_heads * head_dim == hidden_size"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"llama.cpp's bitnet graph uses SiLU gating, the student uses {cfg.hidden_act!r}"
    return None


def gguf_graph_unsupported(cfg) -> str | None:
    """Why the llama.cpp graph the architecture table names for ``cfg.model_type`` (its ``gguf`` field) cannot run a
    model of config ``cfg`` exactly (``None``: it can); decided from the config, before any work. The ``bitnet``
    graph's further conditions are :func:`bitnet_graph_unsupported`."""
    model_type = getattr(cfg, "model_type", None)
    spec = SUPPORTED_ARCHITECTURES.get(model_type)
    if spec is None or spec.gguf is None:
        return f"bitdistill has no llama.cpp mapping for {model_type!r}"
    _, scaling = _rope(cfg)
    if scaling is not None:
        return (f"RoPE scaling {scaling.get('rope_type', scaling.get('type'))!r} is not exported to GGUF by bitdistill; "
                "export a model without rope_scaling")
    if spec.gguf_permute_qk and getattr(cfg, "sliding_window", None):
        return (f"sliding_window={cfg.sliding_window}: llama.cpp's llama graph attends to the whole context; export a "
                "model with sliding_window=None")
    if spec.gguf in ("gpt2", "gptneox"):
        act = getattr(cfg, "activation_function", None) or getattr(cfg, "hidden_act", None)
        if act not in _GELU:
            return f"llama.cpp's {spec.gguf} graph has a GELU MLP, the model uses {act!r}"
    if spec.gguf == "gpt2" and (not getattr(cfg, "scale_attn_weights", True)
                                or getattr(cfg, "scale_attn_by_inverse_layer_idx", False)):
        return ("llama.cpp's gpt2 graph scales attention scores by 1/sqrt(head_dim) alone (scale_attn_weights=True, "
                "scale_attn_by_inverse_layer_idx=False)")
    if spec.gguf == "gptneox" and not getattr(cfg, "attention_bias", True):
        return "llama.cpp's gptneox graph needs the query_key_value and dense biases (attention_bias=True)"
    return None


def _check_bitnet(model: nn.Module, converted: dict[str, nn.Module]) -> None:
    """Refuse a packed ``BitNetForCausalLM`` whose graph differs from llama.cpp's ``bitnet`` one (one line each)."""
    cfg = model.config
    eps = {float(m.variance_epsilon) for n, m in model.named_modules() if n.endswith(("attn_sub_norm", "ffn_sub_norm"))}
    why = bitnet_graph_unsupported(cfg)
    if why is None and eps != {float(cfg.rms_norm_eps)}:
        why = (f"its SubLN eps {sorted(eps)} differs from rms_norm_eps {cfg.rms_norm_eps} (llama.cpp's bitnet "
               "uses one eps for every norm)")
    if why is None and len(converted) != 7 * cfg.num_hidden_layers:
        why = "llama.cpp's bitnet graph needs all seven projections of every block ternary"
    if why:
        raise UserError(f"cannot export this SubLN student to llama.cpp: {why}")


def _as_bitnet(student: nn.Module) -> nn.Module:
    """A SubLN student as ``BitNetForCausalLM`` (:func:`~bitdistill.export.bitnet_arch.subln_to_bitnet`); the
    refusal names llama.cpp."""
    from bitdistill.export.bitnet_arch import bitnet_unmappable, subln_to_bitnet

    why = bitnet_unmappable(student.config)
    if why is not None:
        raise UserError(f"cannot export this SubLN {student.config.model_type} student to llama.cpp: its only graph "
                        f"with SubLN is bitnet (a Llama block), and {why}")
    why = bitnet_graph_unsupported(student.config)
    if why is not None:
        raise UserError(f"cannot export this SubLN student to llama.cpp: {why}")
    return subln_to_bitnet(student)


def _rope(cfg) -> tuple[float, dict | None]:
    """``(rope_theta, scaling)`` across transformers 4.x (``rope_theta``/``rope_scaling``) and 5.x (``rope_parameters``)."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    scaling = getattr(cfg, "rope_scaling", None) or params
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    return float(theta), None if kind in (None, "default") else scaling


def _rotary_fraction(cfg) -> float:
    """The rotated share of each head (GPT-NeoX's ``rotary_pct``): 4.x config attribute or 5.x ``rope_parameters``."""
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None)) or 1.0)


def _hparams(writer, cfg, arch: str) -> None:
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    # GPT-2 keeps its MLP width in n_inner (None: 4 * n_embd)
    writer.add_feed_forward_length((cfg.n_inner or 4 * cfg.hidden_size) if arch == "gpt2" else cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    rms_eps = getattr(cfg, "rms_norm_eps", None)
    if rms_eps is not None:
        writer.add_layer_norm_rms_eps(float(rms_eps))
    else:  # LayerNorm graphs (gpt2, gptneox)
        writer.add_layer_norm_eps(float(getattr(cfg, "layer_norm_eps", None) or cfg.layer_norm_epsilon))
    if arch != "gpt2":  # GPT-2 has learned positions (position_embd), no RoPE
        writer.add_rope_freq_base(_rope(cfg)[0])
        writer.add_rope_dimension_count(int(head_dim * _rotary_fraction(cfg)))
    writer.add_vocab_size(cfg.vocab_size)
    if head_dim != cfg.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(getattr(cfg, "original_max_position_embeddings", None)
                                             or cfg.max_position_embeddings)
    if arch == "gptneox":
        writer.add_parallel_residual(bool(getattr(cfg, "use_parallel_residual", True)))


def _permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half q/k rows -> llama.cpp's interleaved RoPE order (per head: pairs (i, i + d/2) adjacent)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qkv_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """A per-head fused QKV weight ``[heads * 3 * head_dim, in]`` or bias -> llama.cpp's ``[q; k; v]`` row order
    (``[3 * heads * head_dim, ...]``), what its graphs' ``build_qkv`` views."""
    return t.reshape(n_head, 3, t.shape[0] // n_head // 3, *t.shape[1:]).swapaxes(0, 1).reshape(t.shape)


def _to_gguf_layout(t: torch.Tensor, spec: ArchSpec | None, module_name: str, module: nn.Module,
                    n_head: int) -> torch.Tensor:
    """Tensor ``t`` of ``module`` as llama.cpp lays it out: a float ``Conv1D`` weight ``[in, out]`` transposed to
    ``[out, in]`` (a converted layer's codes already are), a per-head fused QKV weight or bias in ``[q; k; v]`` rows.
    Both only move values, so a ternary layer keeps its codes and its one scale."""
    if is_conv1d(module) and t.dim() == 2:
        t = t.t()
    if spec is not None and spec.qkv_per_head and module_name.endswith(spec.qkv[0]):
        t = _qkv_rows(t, n_head)
    return t


def _tokenizer(writer, gguf, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges, pre-tokenizer and special tokens (what llama.cpp's ``gpt2`` model reads)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise UserError(f"the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer; the GGUF export "
                         "needs a tokenizer.json (byte-level BPE)")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"tokenizer model {spec['model']['type']!r} is not byte-level BPE; the GGUF export writes "
                         "llama.cpp 'gpt2' vocabularies only")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if spec.get("normalizer") not in (None, {}) and spec["normalizer"].get("type") != "NFC":
        raise UserError(f"tokenizer normalizer {spec['normalizer'].get('type')!r} has no llama.cpp equivalent")
    vocab = tokenizer.get_vocab()
    added = tokenizer.get_added_vocab()
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                         f"{vocab_size}; use the student's own tokenizer")
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if tok in special else
                         gguf.TokenType.USER_DEFINED if tok in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = spec["model"].get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(tid)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def _pre_tokenizer_name(pre: dict | None) -> str:
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])

    def same(step: dict, want: dict) -> bool:
        for key, value in want.items():
            got = step.get(key)
            if key == "regex":  # tokenizer.json: {"type": "Split", "pattern": {"Regex": ...}}
                pattern = step.get("pattern")
                got = pattern.get("Regex") if isinstance(pattern, dict) else None
            if got != value:
                return False
        return True

    for name, want in PRE_TOKENIZERS.items():
        if len(steps) == len(want) and all(same(s, w) for s, w in zip(steps, want, strict=True)):
            return name
    raise UserError(f"tokenizer pre-tokenizer {json.dumps(pre)[:120]} is not one llama.cpp reproduces here "
                     f"(known: {', '.join(PRE_TOKENIZERS)}); its text would tokenize differently")


def _float_type(gguf, dtype: torch.dtype):
    q = gguf.GGMLQuantizationType
    return {torch.float32: q.F32, torch.bfloat16: q.BF16, torch.float16: q.F16}[dtype]


def _array(gguf, t: torch.Tensor, qtype) -> np.ndarray:
    data = t.detach().float().cpu().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    return gguf.quants.quantize(data, qtype)


def save_gguf(
    model: nn.Module,
    out_file: str | Path,
    *,
    tokenizer,
    gguf_type: str = "tq2_0",
    strict: bool = False,
    float_dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> GGUFReport:
    """Write ``model`` (a BitNet student or a :func:`load_packed` model) as one GGUF file for llama.cpp.

    Args:
        model: a causal LM with BitLinear / PackedBitLinear layers. Not modified.
        out_file: the ``.gguf`` path; its folder must exist; written to a temporary sibling and renamed.
        tokenizer: the model's fast tokenizer (byte-level BPE).
        gguf_type: ``tq2_0`` (2.06 bits/weight) or ``tq1_0`` (1.69) for ternary layers with 256-multiple rows.
        strict: refuse layers whose rows llama.cpp cannot hold as ternary instead of writing them as ``Q8_0``.
        float_dtype: type of embeddings / output head (``None``: as the model holds them; norms and
            biases are always float32).
        overwrite: replace an existing file.

    Returns:
        A :class:`GGUFReport`.
    """
    gguf = require_gguf()
    out_file = Path(out_file)
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"unknown --gguf_type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if not out_file.parent.is_dir():
        raise FileNotFoundError(f"the folder of {out_file} does not exist; create it first")
    if out_file.exists() and not overwrite:
        raise FileExistsError(f"{out_file} already exists; pass --overwrite to replace it")
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    converted = _converted(model)
    if _norm_layout(model, converted):  # a SubLN student: as BitNetForCausalLM (refused there if it has none)
        model = _as_bitnet(model)
        cfg, model_type = model.config, "bitnet"
        converted = _converted(model)
    spec = SUPPORTED_ARCHITECTURES.get(model_type)
    if model_type == "bitnet":
        _check_bitnet(model, converted)
        arch, permute = "bitnet", False
    elif spec is not None and spec.gguf is not None:
        arch, permute = spec.gguf, spec.gguf_permute_qk
    else:
        raise UserError(f"llama.cpp has no mapping here for model_type {model_type!r}; the GGUF export supports "
                         f"{', '.join(GGUF_ARCHITECTURES)} (and Llama SubLN students, or their packed "
                         "BitNetForCausalLM, as bitnet)")
    why = gguf_graph_unsupported(cfg)
    if why is not None:
        raise UserError(f"cannot export this {model_type} model to llama.cpp: {why}")
    ternary_q = getattr(gguf.GGMLQuantizationType, gguf_type.upper())
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)

    report = GGUFReport(arch=arch, gguf_type=gguf_type)
    tensors: list[tuple[str, np.ndarray, object]] = []
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    for key, t in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        if key.endswith("rotary_emb.inv_freq") or (module_name in converted and leaf == "weight_scale"):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        hf_key = key
        for old, new in _SUBLN_RENAME.items():
            hf_key = re.sub(rf"{re.escape(old)}\.weight$", f"{new}.weight", hf_key)
        name = names.get_name(hf_key, try_suffixes=(".weight", ".bias"))
        if t.numel() and ident in seen and not (arch == "gptneox" and name == "output.weight"):
            continue  # tied output head: llama.cpp reuses token_embd (its gptneox graph alone requires `output`)
        seen.add(ident)
        if name is None:
            raise UserError(f"no llama.cpp {arch} tensor for {key!r}; this model's layout is not exported to GGUF")
        if module_name in converted and leaf == "weight":
            codes, gamma = _ternary(module_name, converted[module_name])
            w = _to_gguf_layout(codes.float() * gamma, spec, module_name, converted[module_name], n_head)
            if permute and name.endswith(("attn_q.weight", "attn_k.weight")):
                w = _permute_rows(w, n_head if name.endswith("attn_q.weight") else n_kv)
            out_f, in_f = w.shape
            report.ternary_weights += w.numel()
            if in_f % BLOCK == 0:
                qtype, reason = ternary_q, ""
                report.ternary_in_file += w.numel()
            elif strict:
                raise UserError(f"--strict: {module_name} has in_features={in_f}, not a multiple of {BLOCK}, so "
                                 f"llama.cpp cannot store it as {gguf_type.upper()}; drop --strict to write it as Q8_0")
            else:
                qtype, reason = gguf.GGMLQuantizationType.Q8_0, f"in_features {in_f} % {BLOCK} != 0"
            report.layers.append(GGUFLayer(module_name, name, (out_f, in_f), qtype.name, reason))
            tensors.append((name, gguf.quants.quantize(w.numpy(), qtype), qtype))
            continue
        if not t.is_floating_point():
            raise UserError(f"unexpected non-float tensor {key!r} ({t.dtype}); it has no GGUF mapping")
        if not torch.isfinite(t).all():
            raise UserError(f"cannot export: tensor {key!r} contains NaN or Inf; fix the checkpoint first")
        matrix = t.dim() == 2
        qtype = _float_type(gguf, (float_dtype or t.dtype) if matrix else torch.float32)
        if permute and name.endswith(("attn_q.bias", "attn_k.bias")):
            t = _permute_rows(t, n_head if "attn_q" in name else n_kv)
        t = _to_gguf_layout(t, spec, module_name, model.get_submodule(module_name), n_head)
        tensors.append((name, _array(gguf, t, qtype), qtype))

    report.path = str(out_file)
    _write(gguf, out_file, arch, cfg, tokenizer, tensors, overwrite)
    report.file_bytes = out_file.stat().st_size
    return report


def _write(gguf, out_file: Path, arch: str, cfg, tokenizer, tensors, overwrite: bool) -> None:
    """Write header, metadata and tensors through :func:`bitdistill.io.atomic_write` (a temporary sibling renamed
    into place; a full disk is one line and leaves nothing)."""

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        # general.name: llama.cpp keys vocabulary quirks on it (a name containing "phi3" expects SentencePiece
        # tokens), so it is the source folder's name, never the architecture's.
        writer.add_name(Path(getattr(cfg, "_name_or_path", "") or "").name or "bitdistill student")
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0 if any(q == gguf.GGMLQuantizationType.TQ2_0
                                                                    for *_, q in tensors)
                             else gguf.LlamaFileType.MOSTLY_TQ1_0)
        _hparams(writer, cfg, arch)
        _tokenizer(writer, gguf, tokenizer, cfg.vocab_size)
        for name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=qtype)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    try:
        atomic_write(out_file, write, overwrite=overwrite)
    except FileExistsError:
        raise FileExistsError(f"{out_file} appeared while writing; pass --overwrite to replace it") from None


def pack_gguf(
    src: str | Path,
    out_file: str | Path,
    *,
    gguf_type: str = "tq2_0",
    strict: bool = False,
    from_plain: bool = False,
    gguf_file: str | None = None,
    skip=None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> GGUFReport:
    """``bitdistill pack SRC OUT.gguf --format gguf``: a student, packed or (``from_plain``) plain folder -> GGUF.

    Args:
        src: a student folder, a packed folder (``bitdistill pack`` output) or, with ``from_plain`` /
            ``gguf_file``, any causal LM folder (post-training ternarization).
        out_file: the ``.gguf`` file to write (its folder must exist).
        gguf_type, strict, overwrite: see :func:`save_gguf`.
        from_plain, gguf_file, skip: as for :func:`bitdistill.export.folder.pack_pretrained`.
        dtype: float type of embeddings / output head (``None`` or ``"auto"``: as the source stores them).

    Returns:
        A :class:`GGUFReport`.
    """
    from transformers import AutoTokenizer

    from bitdistill.convert import parse_dtype
    from bitdistill.export.folder import load_pack_source
    from bitdistill.export.loader import load_packed
    from bitdistill.nn.config import folder_kind

    require_gguf()
    src_path, out_file = Path(str(src)), Path(out_file)
    if out_file.suffix != ".gguf":
        raise UserError(f"{out_file}: a GGUF output is one file; name it OUT.gguf")
    if src_path.exists() and src_path.resolve() in out_file.resolve().parents:
        raise UserError(f"{out_file} is inside SRC {src_path}; choose another path (SRC is never modified)")
    if not out_file.parent.is_dir():
        raise FileNotFoundError(f"the folder of {out_file} does not exist; create it first")
    if out_file.exists() and not overwrite:
        raise FileExistsError(f"{out_file} already exists; pass --overwrite to replace it")
    float_dtype = None if dtype in (None, "auto") else parse_dtype(dtype)
    tokenizer = None
    if gguf_file is None and folder_kind(src_path) == "packed":
        model = load_packed(src_path)
    else:
        source = load_pack_source(src, from_plain=from_plain, gguf_file=gguf_file, skip=skip)
        model, tokenizer = source.model, source.tokenizer
        float_dtype = float_dtype or source.dtype
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(src_path))
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"{src_path} has no tokenizer llama.cpp could use ({type(exc).__name__}); copy "
                                    "the model's tokenizer.json into it") from exc
    return save_gguf(model, out_file, tokenizer=tokenizer, gguf_type=gguf_type, strict=strict,
                     float_dtype=float_dtype, overwrite=overwrite)
