"""The SwiGLU product of a Qwen2 MLP recomputed in the backward pass instead of kept.

A Qwen2 MLP is `down_proj(silu(gate) * up)`. For the backward pass autograd keeps gate and up (the
product's gradient needs both) and the product itself (down_proj's input: lora_A's gradient, or the
weight's when it trains), 3 x intermediate_size values a token. The product is an elementwise
function of gate and up, which are kept anyway, so `set_product_recompute` has down_proj's saved
input stand for "recompute it from gate and up" and rebuilds it, with the same kernel and so bit for
bit, when down_proj's backward asks for it. For the 7B with Liger's kernels that is 37 KB of a kept
decoder layer's 167 KB a token (bf16); the cost is one elementwise pass in the backward.

Only for decoder layers that keep their activations: a layer recomputed by activation checkpointing
saves nothing in its forward, and its recomputation must save what its first pass did.
"""

from __future__ import annotations

import types
from typing import Callable

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Recipe:
    """What a saved product becomes: its factors and the function that made it."""

    __slots__ = ("gate", "up", "product", "shape")

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, product: Product, shape: torch.Size):
        self.gate, self.up, self.product, self.shape = gate, up, product, shape


def _product_hooks(product: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, fn: Product):
    """(pack, unpack) saved-tensor hooks replacing `product` (or a contiguous view of all of it, as
    FP8 and LoRA layers reshape their input) by a _Recipe; every other saved tensor passes through."""
    ptr, numel, dtype = product.data_ptr(), product.numel(), product.dtype

    def pack(t: torch.Tensor):
        if t.data_ptr() == ptr and t.numel() == numel and t.dtype == dtype and t.is_contiguous():
            return _Recipe(gate, up, fn, t.shape)
        return t

    def unpack(saved):
        if isinstance(saved, _Recipe):
            with torch.no_grad():
                return saved.product(saved.gate, saved.up).reshape(saved.shape)
        return saved

    return pack, unpack


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    """Qwen2 MLP forward, [.., H] -> [.., H]; down_proj's saved input recomputed when
    `self.recompute_product` (module docstring)."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = self.swiglu_product(gate, up)
    if not (self.recompute_product and torch.is_grad_enabled()):
        return self.down_proj(product)
    with saved_tensors_hooks(*_product_hooks(product, gate, up, self.swiglu_product)):
        return self.down_proj(product)


def _unfused_product(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """transformers' own `act_fn(gate) * up` of the MLP `self`."""
    return self.act_fn(gate) * up


def liger_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Liger's fused SiLU-multiply (the kernel `longvu.kernels` patches in)."""
    from liger_kernel.ops import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(gate, up)


def set_product_recompute(mlp: nn.Module, recompute: bool, fused: bool) -> None:
    """Give `mlp` (a Qwen2 MLP: gate_proj, up_proj, down_proj, act_fn) the forward above, its product
    computed as before (`fused`: Liger's kernel, `longvu.kernels` applied; else transformers'), and
    recomputed in the backward pass when `recompute`."""
    mlp.swiglu_product = liger_product if fused else types.MethodType(_unfused_product, mlp)
    mlp.recompute_product = recompute
    mlp.forward = types.MethodType(_forward, mlp)
