"""Fast greedy decoding for packed (and student) Llama-family models on CPU, batch 1.

``transformers``' ``generate`` spends most of a small model's per-token time outside the matmuls: cache
objects that grow by concatenation, mask construction, rotary tables recomputed per step, logits
processors, thousands of small ops. :class:`FastDecoder` runs the model's own modules (so the packed
layers, norms and MLPs compute exactly what they compute under ``generate``) with

* a static KV cache (preallocated ``[1, n_kv_heads, max_length, head_dim]`` per layer, written in place),
* the rotary cos/sin table computed once for every position (the same values the model computes per step),
* one ``scaled_dot_product_attention`` call per layer (grouped-query attention without ``repeat_kv``),
* logits for the last position only,
* optionally (``int8_head=True``, approximate) an int8 output head: per-row absmax int8 weights with
  float scales through ``torch._weight_int8pack_mm`` (half the bytes of a bf16 head).

Supported: ``llama``, ``mistral``, ``qwen2``, ``qwen3`` and ``phi3`` (fused ``qkv_proj``; partial rotary).
Greedy tokens equal ``model.generate(do_sample=False)`` (tested) unless ``int8_head`` is chosen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitdistill.errors import UserError

__all__ = ["FAST_DECODE_ARCHS", "FastDecoder", "generate_fast"]

FAST_DECODE_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ``cos.shape[-1]`` features of ``x [1, H, T, D]`` (``cos [1, 1, T, R]``)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


class _Int8Head(nn.Module):
    """Output head with int8 weights (per-row absmax scale), activations kept in float: approximate."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [1, T, hidden]`` -> logits ``[1, T, vocab]``."""
        x2d = x.reshape(-1, x.shape[-1]).to(self.scale.dtype).contiguous()
        return torch._weight_int8pack_mm(x2d, self.weight, self.scale).reshape(*x.shape[:-1], -1)


class FastDecoder:
    """A static-cache greedy decoder around a loaded causal LM (the model is not modified).

    Args:
        model: a ``transformers`` causal LM of a :data:`FAST_DECODE_ARCHS` architecture, e.g. from
            :func:`bitdistill.load_packed` or :func:`bitdistill.load_student`.
        max_length: the longest prompt + generation this decoder holds (its KV cache size).
        int8_head: use an int8-weight output head (approximate; see :class:`_Int8Head`).
    """

    def __init__(self, model: nn.Module, max_length: int, *, int8_head: bool = False) -> None:
        cfg = model.config
        if cfg.model_type not in FAST_DECODE_ARCHS:
            raise UserError(f"fast decoding supports {', '.join(FAST_DECODE_ARCHS)}, not {cfg.model_type!r}; "
                             "use model.generate")
        if getattr(cfg, "sliding_window", None) and cfg.model_type != "qwen2":
            raise UserError(f"sliding_window={cfg.sliding_window} is not supported by fast decoding; use model.generate")
        if max_length <= 0 or max_length > cfg.max_position_embeddings:
            raise UserError(f"max_length must be in 1..{cfg.max_position_embeddings} (max_position_embeddings), "
                             f"got {max_length}")
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.max_length = max_length
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.scaling = attn.scaling
        self.fused_qkv = hasattr(attn, "qkv_proj")
        param = self.inner.embed_tokens.weight
        self.dtype, self.device = param.dtype, param.device
        shape = (1, self.n_kv, max_length, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        positions = torch.arange(max_length, device=self.device)[None]
        with torch.no_grad():
            cos, sin = self.inner.rotary_emb(param[:1][None], positions)
        self.cos, self.sin = cos[:, None], sin[:, None]  # [1, 1, max_length, rot]
        self.head = _Int8Head(model.lm_head.weight) if int8_head else model.lm_head

    def _attention(self, layer: nn.Module, i: int, h: torch.Tensor, pos: int) -> torch.Tensor:
        attn = layer.self_attn
        t = h.shape[1]
        if self.fused_qkv:
            qkv = attn.qkv_proj(h)
            q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                 self.n_kv * self.head_dim], dim=-1)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = q.view(1, t, -1, self.head_dim)
        k = k.view(1, t, -1, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(1, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = self.cos[:, :, pos:pos + t], self.sin[:, :, pos:pos + t]
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        self.k_cache[i][:, :, pos:pos + t] = k
        self.v_cache[i][:, :, pos:pos + t] = v
        keys, values = self.k_cache[i][:, :, :pos + t], self.v_cache[i][:, :, :pos + t]
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1, scale=self.scaling,
                                             enable_gqa=self.n_kv != self.n_heads)
        return attn.o_proj(out.transpose(1, 2).reshape(1, t, -1))

    def step(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """Run ``ids [1, T]`` at positions ``pos..pos+T-1``; returns the last position's logits ``[1, vocab]``."""
        h = self.inner.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            h = h + self._attention(layer, i, layer.input_layernorm(h), pos)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.head(self.inner.norm(h[:, -1:]))[:, -1]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation of ``input_ids [1, T]``; returns ``[1, T + n]`` (``n <= max_new_tokens``)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise UserError(f"input_ids must be [1, T] (batch 1), got {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        if t + max_new_tokens > self.max_length:
            raise UserError(f"prompt {t} + max_new_tokens {max_new_tokens} exceeds this decoder's max_length "
                             f"{self.max_length}")
        ids = input_ids.to(self.device)
        out = [ids]
        logits = self.step(ids, 0)
        for n in range(max_new_tokens):
            token = logits.argmax(dim=-1, keepdim=True)
            out.append(token)
            if n + 1 == max_new_tokens or (eos_token_id is not None and token.item() == eos_token_id):
                break
            logits = self.step(token, t + n)
        return torch.cat(out, dim=1)


def generate_fast(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, int8_head: bool = False,
                  eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding with a static KV cache (see :class:`FastDecoder`); returns ``[1, T + n]`` token ids.

    Builds a decoder sized for this call; reuse a :class:`FastDecoder` to decode repeatedly without
    rebuilding the cache.
    """
    decoder = FastDecoder(model, input_ids.shape[-1] + max_new_tokens, int8_head=int8_head)
    return decoder.generate(input_ids, max_new_tokens, eos_token_id=eos_token_id)
