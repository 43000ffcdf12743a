"""Find a causal LM's decoder-layer list generically and call one decoder layer on stored hidden states.

No architecture is named here: the layer list is the ``nn.ModuleList`` holding ``config.num_hidden_layers``
modules (the largest such list by parameter count). A layer's extra inputs (rotary position embeddings,
attention mask, position ids, ...) are captured once from a real forward of the model with a pre-hook on
the first layer (every layer of a decoder stack receives the same ones), and replayed with stored hidden
states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bitdistill.errors import UserError

__all__ = ["LayerCall", "capture_layer_call", "decoder_layers", "layer_output"]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, layers)``: the model's decoder-layer list.

    Raises:
        ValueError: no ``nn.ModuleList`` of ``config.num_hidden_layers`` modules exists (one line, naming the model).
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and n is not None and len(m) == n and n > 0]
    if not found:
        raise UserError(f"cannot find the decoder blocks of {type(model).__name__}: it has no nn.ModuleList of "
                         f"config.num_hidden_layers={n} layers; block-wise recovery needs a standard decoder stack "
                         "(use the end-to-end recipe instead)")
    return max(found, key=lambda item: sum(p.numel() for p in item[1].parameters()))


class _Stop(Exception):
    pass


@dataclass
class LayerCall:
    """What a decoder layer receives besides its hidden states, for batches of ``batch`` sequences.

    Attributes:
        args: positional arguments after the hidden states.
        kwargs: keyword arguments (caches disabled).
        batch: the batch size they were captured with (replay with batches of that size).
    """

    args: tuple
    kwargs: dict
    batch: int


@torch.no_grad()
def capture_layer_call(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, LayerCall]:
    """Run ``model`` on ``input_ids [B, S]`` up to its first decoder layer.

    Returns:
        ``(hidden [B, S, hidden], call)``: the first layer's input hidden states and its other inputs.
    """
    _, layers = decoder_layers(model)
    seen: dict = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen["hidden"] = hidden.detach().clone()
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value",
                                                                "layer_past")}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        seen["call"] = LayerCall(tuple(args[1:]), kwargs, input_ids.shape[0])
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "call" not in seen:
        raise ValueError(f"{type(model).__name__}'s forward never reached its first decoder layer")
    return seen["hidden"], seen["call"]


def layer_output(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """``layer``'s output hidden states for ``hidden [call.batch, S, hidden]`` (the first element of a tuple output)."""
    if hidden.shape[0] != call.batch:
        raise ValueError(f"replay batches must have {call.batch} sequences (the captured batch), got {hidden.shape[0]}")
    out = layer(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out
