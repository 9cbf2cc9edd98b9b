"""Activation offloading: chosen decoder layers keep their saved activations in host memory.

`training.offloaded_layers: N` sends the first N LLM decoder layers' saved activations to pinned host
memory as the forward pass makes them, and brings them back during the backward pass, one layer ahead
of need: a layer's reload starts when the backward pass reaches the layer after it. The copies run on
a side stream, so they overlap with the other layers' compute; the GPU memory of an activation is free
once its copy is done. Offloading costs PCIe bandwidth instead of compute: it pays where a layer's
recomputation (activation checkpointing) costs more than its copies, which hide behind compute as long
as the forward pass's copies stay within the link's bandwidth. The first layers go because their
activations are needed last, which leaves the most time for both copies.

What is offloaded: saved tensors of at least MIN_BYTES that are activations (non-leaf tensors that
need a gradient); parameters and their views, frozen weights and small tensors stay where they are. A
tensor saved by several operations is copied once. Host buffers come from a pool kept across steps
(`HostPool`). Without a CUDA GPU the "host copy" is a second CPU tensor: the bookkeeping runs (the
tests), nothing is saved.
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

MIN_BYTES = 1 << 20


class _Offloaded:
    """One saved activation: its host copy (`host`, a view of the pool buffer `buffer`) and, once
    reloaded, its device copy (`device_copy`, usable after the event `ready`)."""

    __slots__ = ("buffer", "host", "device", "device_copy", "ready")

    def __init__(self, buffer: torch.Tensor, host: torch.Tensor, device: torch.device):
        self.buffer, self.host, self.device, self.device_copy, self.ready = buffer, host, device, None, None


class HostPool:
    """Host buffers (pinned when `pin`) kept and reused from step to step: allocating pinned memory each
    time runs at a fraction of the link's bandwidth (9 GB/s against 55 on an H200,
    scripts/bench/offload_bandwidth.py). Sizes are rounded up to a sixteenth of their power of two, so
    token counts that vary a little between steps reuse the same buffers."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.free: dict[int, list[torch.Tensor]] = {}
        self.allocated = 0  # bytes ever allocated

    @staticmethod
    def size_class(nbytes: int) -> int:
        step = 1 << max(nbytes.bit_length() - 5, 12)
        return -(-nbytes // step) * step

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least `nbytes`."""
        size = self.size_class(nbytes)
        if self.free.get(size):
            return self.free[size].pop()
        self.allocated += size
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)

    def give(self, buffer: torch.Tensor) -> None:
        """Return `buffer`: the next `take` may hand it out (stream order keeps a pending copy first)."""
        self.free.setdefault(buffer.numel(), []).append(buffer)


class ActivationOffloader:
    """Moves the saved activations of the modules it `wrap`s to host memory and back (module docstring).
    `layers` [L0, L1, ...] in forward order; each wrapped one's reload starts at the start of the next
    one's backward pass (the last one's: when its own backward asks for its first tensor)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending: dict[int, list[_Offloaded]] = {}  # layer -> activations not yet reloaded
        self.pool = HostPool(pin=self.stream is not None)
        self.copied = 0  # bytes sent to the host so far (for the tests and logs)

    def wrap(self, layers: list[nn.Module], indices: list[int]) -> None:
        """Offload the saved activations of `layers[i]` for each i in `indices`."""
        for i in indices:
            layer = layers[i]
            layer.forward = types.MethodType(_offloading_forward(self, i, type(layer).forward), layer)
            if i + 1 < len(layers):
                layers[i + 1].register_forward_hook(self._prefetch_hook(i))

    # --- forward: to the host ----------------------------------------------------------------------

    def hooks(self, layer: int):
        """(pack, unpack) for one forward of `layer`."""
        seen: dict[tuple, tuple[weakref.ref, _Offloaded]] = {}
        self.pending[layer] = []  # (one forward, then its backward: a graph left unreloaded keeps its buffers)

        def pack(t: torch.Tensor):
            if not _is_activation(t) or t.numel() * t.element_size() < MIN_BYTES:
                return t
            key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            if key in seen and seen[key][0]() is not None:  # the same tensor, still alive: its copy is made
                return seen[key][1]
            # (a dead tensor's memory, once offloaded, is soon another tensor's: never matched by address alone)
            offloaded = self._to_host(t)
            seen[key] = weakref.ref(t), offloaded
            self.pending[layer].append(offloaded)
            return offloaded

        def unpack(saved):
            if not isinstance(saved, _Offloaded):
                return saved
            if saved.device_copy is None:  # its reload was not started ahead: start it now
                self.reload(layer)
            if saved.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(saved.ready)
            return saved.device_copy

        return pack, unpack

    def _to_host(self, t: torch.Tensor) -> _Offloaded:
        nbytes = t.numel() * t.element_size()
        buffer = self.pool.take(nbytes)
        host = buffer[:nbytes].view(t.dtype).view(t.shape)
        if self.stream is None:
            host.copy_(t.detach())
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t.detach(), non_blocking=True)
            t.record_stream(self.stream)  # its memory is reused only once the copy is done
        self.copied += nbytes
        return _Offloaded(buffer, host, t.device)

    # --- backward: back to the GPU -------------------------------------------------------------------

    def reload(self, layer: int) -> None:
        """Start copying `layer`'s activations back (once per forward) and return their host buffers to
        the pool (a later copy into one runs after this one on the same stream)."""
        for offloaded in self.pending.pop(layer, []):
            if self.stream is None:
                offloaded.device_copy = offloaded.host.clone()
            else:
                current = torch.cuda.current_stream(self.device)
                device_copy = torch.empty(offloaded.host.shape, dtype=offloaded.host.dtype, device=offloaded.device)
                self.stream.wait_stream(current)  # the new block may still be read by work queued before it
                with torch.cuda.stream(self.stream):
                    device_copy.copy_(offloaded.host, non_blocking=True)
                    offloaded.ready = self.stream.record_event()
                device_copy.record_stream(self.stream)
                offloaded.device_copy = device_copy
            self.pool.give(offloaded.buffer)
            offloaded.buffer = offloaded.host = None

    def _prefetch_hook(self, layer: int):
        """Forward hook of the layer after `layer`: its output's gradient (the start of its backward pass)
        starts `layer`'s reload."""
        def hook(_module, _args, output):
            if isinstance(output, torch.Tensor) and output.requires_grad and layer in self.pending:
                output.register_hook(lambda grad: self.reload(layer))
        return hook


def _is_activation(t: torch.Tensor) -> bool:
    """Whether `t` is (a view of) a tensor the forward pass made and the backward needs: not a parameter,
    a view of one (a transposed weight) or a frozen tensor."""
    base = t if t._base is None else t._base
    return t.requires_grad and not base.is_leaf


def _offloading_forward(offloader: ActivationOffloader, layer: int, forward):
    """`forward` (the layer class's) under the offloader's saved-tensor hooks while autograd records."""
    def offloading_forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(self, *args, **kwargs)
        with saved_tensors_hooks(*offloader.hooks(layer)):
            return forward(self, *args, **kwargs)
    return offloading_forward
