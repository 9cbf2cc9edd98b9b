"""What autograd keeps for a backward pass, measured with saved-tensor hooks."""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_bytes(forward: Callable[[], object], outside: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves while `forward()` runs, leaving out the storages
    of `outside` (parameters, inputs: held anyway)."""
    excluded = {t.untyped_storage().data_ptr() for t in outside}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(kept.values())
