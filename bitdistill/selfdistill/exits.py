"""Multi-exit causal LMs: an LM-head exit after every transformer block (or a chosen subset).

"Be Your Own Teacher" (Zhang et al., ICCV 2019) puts a classifier after each stage of a network; for
a language model the classifier is an LM head over the vocabulary. :class:`MultiExitLM` wraps any
transformers causal LM whose blocks and final norm :func:`bitdistill.nn.arch.find_blocks` finds (the
architecture table, or the block layout), captures
each block's output with forward hooks during one ordinary forward pass, and applies an exit to it:

- ``"shared"`` (variant a): the model's own final norm and LM head, shared by every exit;
- ``"separate"`` (variant b): a copy of the final norm and LM head per exit, initialized from them;
- ``"concat"`` (variant c): one classifier over the concatenated features of all exited blocks:
  ``head(norm(W [h_1; ...; h_n]))`` with ``W [hidden, n * hidden]`` initialized to the mean over blocks.

The deepest exit is always the model's own output (final norm + head after the last block). Works
the same on full-precision and BitNet (BitLinear) models: exits are ordinary modules.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bitdistill.errors import UserError
from bitdistill.nn.arch import find_blocks

__all__ = ["EXIT_VARIANTS", "MultiExitLM", "MultiExitOutput", "find_blocks"]

EXIT_VARIANTS = ("shared", "separate", "concat")


@dataclass
class MultiExitOutput:
    """Logits ``[B, T, V]`` and block features ``[B, T, H]`` of every exit, shallowest first.

    ``exit_layers[i]`` is the 0-based block index after which exit ``i`` sits (for ``concat``, the
    classifier's entry is ``-1``); the last entry is always the deepest exit (the model's own output).
    """

    logits: list[torch.Tensor]
    hidden: list[torch.Tensor]
    exit_layers: list[int]


class MultiExitLM(nn.Module):
    """A causal LM with an exit after each chosen block.

    Args:
        model: a transformers causal LM (full precision or converted with ``replace_linear_with_bitlinear``).
        exit_layers: 0-based block indices to put exits after (default: every block but the last,
            whose exit is the model's own head). Negative indices count from the end.
        variant: ``"shared"``, ``"separate"`` or ``"concat"`` (see the module docstring).
    """

    def __init__(self, model: nn.Module, exit_layers: Sequence[int] | None = None, variant: str = "shared") -> None:
        super().__init__()
        if variant not in EXIT_VARIANTS:
            raise UserError(f"unknown exit variant {variant!r}; choose one of {', '.join(EXIT_VARIANTS)}")
        blocks, norm = find_blocks(model)
        head = model.get_output_embeddings()
        if head is None:
            raise UserError(f"{type(model).__name__} has no output head (get_output_embeddings() is None)")
        n = len(blocks)
        layers = list(range(n - 1)) if exit_layers is None else [i + n if i < 0 else i for i in exit_layers]
        bad = [i for i in layers if not 0 <= i < n - 1]
        if bad:
            raise UserError(f"exit layer indices {bad} are out of range: {type(model).__name__} has {n} blocks, "
                            f"so exits go after blocks 0..{n - 2} (block {n - 1}'s exit is the model's own head)")
        if not layers:
            raise UserError("no exit layer chosen: pass at least one block index")
        self.model = model
        self.variant = variant
        self.exit_layers = sorted(set(layers))
        # Plain references into ``model`` (not registered again: each parameter appears once in state_dict).
        object.__setattr__(self, "_blocks", blocks)
        object.__setattr__(self, "_norm", norm)
        object.__setattr__(self, "_head", head)
        hidden = head.in_features
        if variant == "separate":
            self.exit_norms = nn.ModuleList(copy.deepcopy(norm) for _ in self.exit_layers)
            self.exit_heads = nn.ModuleList(copy.deepcopy(head) for _ in self.exit_layers)
        elif variant == "concat":
            k = len(self.exit_layers)
            self.concat_proj = nn.Linear(k * hidden, hidden, bias=False, device=head.weight.device,
                                         dtype=head.weight.dtype)
            with torch.no_grad():
                self.concat_proj.weight.copy_(torch.eye(hidden).repeat(1, k) / k)

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def output_layers(self) -> list[int]:
        """``MultiExitOutput.exit_layers`` of this model's forward: the exits' blocks (``-1``: concat), deepest last."""
        if self.variant == "concat":
            return [-1, self.num_blocks - 1]
        return [*self.exit_layers, self.num_blocks - 1]

    def exit_logits(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` of per-block exit number ``i`` (index into ``exit_layers``) on features ``h``."""
        if self.variant == "separate":
            return self.exit_heads[i](self.exit_norms[i](h))
        return self._head(self._norm(h))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> MultiExitOutput:
        """One forward pass of the wrapped model; ``input_ids [B, T]`` -> logits and features of every exit."""
        captured: dict[int, torch.Tensor] = {}
        wanted = [*self.exit_layers, self.num_blocks - 1]

        def hook(index):
            def fn(module, args, output):
                captured[index] = output[0] if isinstance(output, tuple) else output
            return fn

        handles = [self._blocks[i].register_forward_hook(hook(i)) for i in wanted]
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        hidden = [captured[i] for i in wanted]
        if self.variant == "concat":
            fused = self.concat_proj(torch.cat(hidden[:-1], dim=-1))
            return MultiExitOutput([self._head(self._norm(fused)), out.logits], [fused, hidden[-1]],
                                   self.output_layers)
        logits = [self.exit_logits(j, h) for j, h in enumerate(hidden[:-1])]
        return MultiExitOutput([*logits, out.logits], hidden, self.output_layers)
