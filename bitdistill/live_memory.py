"""The peak of live tensor bytes of a piece of code, on any device (CPU included): what ``bitdistill plan`` is
checked against.

:class:`LiveTensorBytes` is a ``TorchDispatchMode``: it records the storage of every tensor an op returns (and of
the tensors it is given to start with: parameters, a teacher), and drops a storage once no tensor holds it any
more. ``peak`` is the largest sum of live storage bytes seen after any op. It counts tensors, not the allocator's
caching or the process's RSS; temporaries that live only inside one op (inside a fused kernel) are not seen.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LiveTensorBytes"]


class LiveTensorBytes(TorchDispatchMode):
    """Track live tensor storage bytes; ``current`` and ``peak`` in bytes.

    Args:
        initial: tensors alive before the block (counted from the start, each storage once).
    """

    def __init__(self, initial: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        for t in initial:
            self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ref = StorageWeakRef(storage)
        if ref.cdata in self._live:
            return
        self._live[ref.cdata] = (ref, storage.nbytes())
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)

    def _collect(self) -> None:
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            self.current -= self._live.pop(key)[1]

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        self._collect()
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._collect()
        for t in pytree.tree_leaves(out):
            self._track(t)
        return out
