"""Capture the Q/K/V projections of chosen decoder layers with forward hooks (for the relation loss).

The hooks read the *outputs* of ``q_proj``/``k_proj``/``v_proj`` (or split a fused ``qkv_proj``), i.e. the
states before rotary embedding, per-head norms and, for grouped-query attention, before K/V heads are
repeated. Supported architectures: those :func:`bitdistill.nn.arch.lookup` finds Q/K/V in.
"""

from __future__ import annotations

import torch
from torch import nn

from bitdistill.errors import UserError
from bitdistill.nn.arch import arch_spec, decoder_layers

__all__ = ["QKVCapture", "resolve_layer_indices"]


def resolve_layer_indices(indices: list[int], num_layers: int, who: str) -> list[int]:
    """Turn possibly negative block indices into ``0..num_layers-1``; error on out-of-range ones."""
    out = []
    for i in indices:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise UserError(f"attention layer {i} does not exist in the {who}, which has blocks 0..{num_layers - 1}")
        out.append(j)
    return out


class QKVCapture:
    """Forward hooks recording ``{"q", "k", "v"}`` -> ``[B, T, D]`` for each chosen block of ``model``.

    Use as a context manager around the forward pass; ``states`` holds ``[q_0, k_0, v_0, q_1, ...]`` in
    the order of ``layers`` afterwards (cleared at each ``__enter__``).
    """

    def __init__(self, model: nn.Module, layers: list[int]) -> None:
        spec = arch_spec(model, "the attention relation loss", "turn it off with --attention_weight 0",
                         needs="attention")
        _, blocks = decoder_layers(model)
        self.layers = resolve_layer_indices(layers, len(blocks), type(model).__name__)
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self._split = (cfg.num_attention_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
        self._per_head = (cfg.num_attention_heads, head_dim) if spec.qkv_per_head else None
        self._modules = [[blocks[i].get_submodule(n) for n in spec.qkv] for i in self.layers]
        self._handles: list = []
        self._captured: dict[tuple[int, int], torch.Tensor] = {}

    def _hook(self, layer: int, part: int):
        def hook(_module, _inputs, output):
            self._captured[(layer, part)] = output
        return hook

    def __enter__(self) -> QKVCapture:
        self._captured = {}
        for li, mods in enumerate(self._modules):
            for pi, m in enumerate(mods):
                self._handles.append(m.register_forward_hook(self._hook(li, pi)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def states(self) -> list[torch.Tensor]:
        """``[q, k, v]`` of each captured layer, flattened in layer order."""
        out = []
        for li, mods in enumerate(self._modules):
            if (li, 0) not in self._captured:
                raise RuntimeError("QKVCapture has no states; run the model's forward inside the context")
            if len(mods) == 1 and self._per_head is not None:  # [..., heads, 3 * head_dim] (GPT-NeoX)
                fused = self._captured[(li, 0)]
                heads = fused.view(*fused.shape[:-1], self._per_head[0], 3 * self._per_head[1])
                out.extend(t.flatten(-2) for t in heads.split(self._per_head[1], dim=-1))
            elif len(mods) == 1:
                out.extend(torch.split(self._captured[(li, 0)], self._split, dim=-1))
            else:
                out.extend(self._captured[(li, p)] for p in range(3))
        return out
