"""Where the attention projections and block outputs live in each supported architecture."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bitdistill.errors import UserError

__all__ = ["SUPPORTED_ARCHITECTURES", "ArchSpec", "arch_spec", "decoder_layers"]


@dataclass(frozen=True)
class ArchSpec:
    """Module names inside one decoder block.

    Attributes:
        qkv: ``(q, k, v)`` projection names, or a single fused projection name.
        attn_out: the attention output projection (SubLN goes before it).
        mlp_out: the MLP down projection (SubLN goes before it).
    """

    qkv: tuple[str, ...]
    attn_out: str
    mlp_out: str


_SEPARATE = ArchSpec(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj", "mlp.down_proj")

SUPPORTED_ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _SEPARATE,
    "mistral": _SEPARATE,
    "qwen2": _SEPARATE,
    "qwen3": _SEPARATE,
    "phi3": ArchSpec(("self_attn.qkv_proj",), "self_attn.o_proj", "mlp.down_proj"),
}


def arch_spec(model: nn.Module, feature: str, fix: str | None = None) -> ArchSpec:
    """The :class:`ArchSpec` of ``model`` (by ``config.model_type``); ``feature`` names what needs it and ``fix``
    how to do without it, for the error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{feature} does not support architecture {model_type!r}; supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}{f'; {fix}' if fix else ''}")
    return SUPPORTED_ARCHITECTURES[model_type]


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
