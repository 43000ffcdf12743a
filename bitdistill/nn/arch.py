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


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the ``ModuleList`` of the model's decoder blocks (``config.num_hidden_layers`` long)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.endswith("layers"):
            return name, module
    raise UserError(f"cannot find the {n} decoder layers of {type(model).__name__}")
