"""Call one decoder layer of a causal LM on stored hidden states.

No architecture is named here: the layer list is :func:`bitdistill.nn.arch.decoder_layers`. A layer's extra inputs
(rotary position embeddings, attention mask, position ids, ...) are captured once from a real forward of the model
with a pre-hook on the first layer (every layer of a decoder stack receives the same ones), and replayed with stored
hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bitdistill.nn.arch import decoder_layers

__all__ = ["LayerCall", "capture_layer_call", "layer_output"]


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
