"""What autograd keeps for a backward pass, measured with saved-tensor hooks."""

from __future__ import annotations

from typing import Callable, Iterable

import torch


class SavedStorages:
    """A pack hook that records the distinct storages autograd saves (`bytes`: their total), leaving
    out the storages of `outside` (parameters, inputs: held anyway). Call it on what an inner
    saved-tensor hook keeps as a tensor too: an outer hook does not see what an inner one packs."""

    def __init__(self, outside: Iterable[torch.Tensor] = ()):
        self.excluded = {t.untyped_storage().data_ptr() for t in outside}
        self.kept: dict[int, int] = {}

    def __call__(self, t):
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.excluded:
                self.kept[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.kept.values())


def saved_bytes(forward: Callable[[], object], outside: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves while `forward()` runs, leaving out the storages
    of `outside` (parameters, inputs: held anyway)."""
    record = SavedStorages(outside)
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        forward()
    return record.bytes
