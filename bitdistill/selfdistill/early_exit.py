"""Early-exit greedy decoding: each new token is taken from the first exit confident enough.

For every generated token the wrapped model runs block by block (one ordinary forward pass whose
hooks stop it) and, after each exit's block, reads that exit's next-token distribution; the first exit
whose top probability reaches ``threshold`` emits the token and the remaining blocks are skipped.
No KV cache is used: each step recomputes the prefix up to the exit it takes, so every position's
states are exactly what the model computes (no copied or stale states of skipped layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitdistill.errors import UserError
from bitdistill.eval.perplexity import PerplexityResult, strided_perplexities
from bitdistill.nn.fast_decode import greedy_token
from bitdistill.selfdistill.exits import MultiExitLM

__all__ = ["EarlyExitResult", "early_exit_generate", "early_exit_logits", "early_exit_perplexity"]


@dataclass
class EarlyExitResult:
    """``sequences [1, T + n]`` and, per generated token, the 0-based block after which it exited."""

    sequences: torch.Tensor
    exit_blocks: list[int]
    num_blocks: int

    @property
    def mean_depth_fraction(self) -> float:
        """Average fraction of the blocks run per generated token (1.0 = no early exit)."""
        return 0.0 if not self.exit_blocks else sum(b + 1 for b in self.exit_blocks) / (len(self.exit_blocks) * self.num_blocks)


class _Exit(Exception):
    def __init__(self, logits: torch.Tensor, block: int) -> None:
        super().__init__()
        self.logits, self.block = logits, block


@torch.no_grad()
def early_exit_generate(multi_exit: MultiExitLM, input_ids: torch.Tensor, *, max_new_tokens: int,
                        threshold: float, eos_token_id: int | None = None) -> EarlyExitResult:
    """Greedy decoding with confidence-based early exit.

    Args:
        multi_exit: a ``"shared"`` or ``"separate"`` :class:`MultiExitLM`.
        input_ids: ``[1, T]`` prompt.
        max_new_tokens: tokens to generate at most.
        threshold: top-probability an exit needs to stop; ``> 1`` disables early exit (full depth).
        eos_token_id: stop after this token.
    """
    if multi_exit.variant == "concat":
        raise UserError("early exit needs per-block exits; the 'concat' classifier reads every block")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise UserError(f"early_exit_generate decodes one sequence: input_ids must be [1, T], got {tuple(input_ids.shape)}")
    blocks = multi_exit._blocks
    n = multi_exit.num_blocks
    ids = input_ids
    exits: list[int] = []
    for _ in range(max_new_tokens):
        def hook(j, block_index):
            def fn(module, args, output):
                h = output[0] if isinstance(output, tuple) else output
                logits = multi_exit.exit_logits(j, h[:, -1:])[:, -1]
                if torch.softmax(logits.float(), -1).max() >= threshold:
                    raise _Exit(logits, block_index)
            return fn

        handles = [blocks[b].register_forward_hook(hook(j, b)) for j, b in enumerate(multi_exit.exit_layers)]
        try:
            logits, block = multi_exit.model(input_ids=ids, use_cache=False).logits[:, -1], n - 1
        except _Exit as stop:
            logits, block = stop.logits, stop.block
        finally:
            for h in handles:
                h.remove()
        token = greedy_token(logits)
        ids = torch.cat([ids, token.to(ids.dtype)], dim=1)
        exits.append(block)
        if eos_token_id is not None and token.item() == eos_token_id:
            break
    return EarlyExitResult(ids, exits, n)


def early_exit_logits(logits: Sequence[torch.Tensor], threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the logits of the first exit whose top probability reaches ``threshold``.

    Args:
        logits: per exit ``[B, T, V]``, shallowest first, the deepest last (taken when no exit is confident).
        threshold: top-probability needed to stop (``> 1``: always the deepest exit).

    Returns:
        ``(chosen [B, T, V], exit_index [B, T])`` with ``exit_index`` the position in ``logits`` taken.
    """
    chosen = logits[-1].clone()
    index = torch.full(chosen.shape[:-1], len(logits) - 1, dtype=torch.long, device=chosen.device)
    undecided = torch.ones_like(index, dtype=torch.bool)
    for i, z in enumerate(logits[:-1]):
        take = undecided & (torch.softmax(z.float(), -1).amax(-1) >= threshold)
        chosen[take] = z[take].to(chosen.dtype)
        index[take] = i
        undecided &= ~take
    return chosen, index


@torch.no_grad()
def early_exit_perplexity(multi_exit: MultiExitLM, input_ids: torch.Tensor, *, threshold: float, max_length: int,
                          max_windows: int | None = None) -> tuple[PerplexityResult, float]:
    """Teacher-forced quality of early-exit decoding: strided perplexity when every token is predicted by the
    exit :func:`early_exit_generate` would take at ``threshold``, and the mean fraction of blocks run.

    Each position's exit depends only on its prefix, so this is exactly the distribution early-exit decoding
    uses at that position given the true prefix. ``input_ids [N]`` is 1-D; windows do not overlap.
    """
    if multi_exit.variant == "concat":
        raise UserError("early exit needs per-block exits; the 'concat' classifier reads every block")
    depth = torch.tensor([b + 1 for b in multi_exit.output_layers], dtype=torch.float64)
    used: list[torch.Tensor] = []

    def fn(ids: torch.Tensor) -> list[torch.Tensor]:
        chosen, index = early_exit_logits(multi_exit(ids).logits, threshold)
        used.append(depth[index[0, :-1].cpu()])
        return [chosen]

    (result,) = strided_perplexities(fn, multi_exit, input_ids, max_length=max_length, max_windows=max_windows)
    return result, (torch.cat(used).mean() / multi_exit.num_blocks).item()
