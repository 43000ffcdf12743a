"""State-dict helpers shared by the exporter and the trainers."""

from __future__ import annotations

import torch

__all__ = ["unique_tensors"]


def unique_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` keeping the first name of every tensor that several names share (tied embeddings, shared
    heads), in order; safetensors refuses aliases. Two names share a tensor when they view the same storage at
    the same offset with the same shape; empty tensors are always kept. The tensors are not copied."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() == 0 or key not in seen:
            seen.add(key)
            out[name] = t
    return out
