"""What a Qwen2 decoder layer that keeps its activations holds for its backward pass.

Autograd keeps every tensor a kept layer's backward needs. Three kinds can be held for less
(`set_kept_layer_saving`, per layer):

- `norm_outputs`: the two RMSNorm outputs (the inputs of q/k/v and of gate/up, 2 x H a token) are
  rebuilt from the norm's input, which the norm's backward keeps anyway, with the same kernel: the
  same values. This pays with Liger's RMSNorm, which keeps its input; transformers' keeps fp32 copies
  instead (in bf16), so the input would be held on top of them.
- `product`: the MLP product silu(gate) * up (down_proj's input, I a token) is rebuilt from gate and
  up, which the SwiGLU's backward keeps anyway, with the same kernel: the same values.
- `fp8_mlp`: gate and up themselves (2 x I a token) are held in e4m3 with one fp32 scale per block
  of 128 values along the intermediate dimension (one block per row when 128 does not divide it),
  1.03 bytes a value instead of 2 in bf16, and dequantized when the backward needs them. Lossy: the
  MLP's backward (and the product rebuilt from them) sees gate and up rounded to 3 mantissa bits.

How: the layer's forward runs inside saved-tensor hooks. Its norms and its MLP register what they
produce, each with its recipe; a saved tensor that is a registered one (the same storage, all of it,
contiguous, as the flat views the linear layers take) is packed as that recipe and rebuilt in the
unpack hook; every other tensor passes through. The registry holds the tensors it names for the
layer's forward call only: meanwhile no address is reused, and afterwards it holds nothing (autograd
keeps the hooks, and so the registry, as long as it keeps what they packed).

Only for decoder layers that keep their activations: a layer recomputed by activation checkpointing
saves nothing in its first pass, and its recomputation must save what that pass did.
"""

from __future__ import annotations

import types
from typing import Callable

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from longvu.fp8 import compiled_on_gpu, quantize
from longvu.kernels import runs_triton

BLOCK = 128  # values per FP8 scale along the last dimension
_active: list["_Registry"] = []  # the registry of the kept layer whose forward is running


def block_size(width: int) -> int:
    """Values per FP8 scale for a last dimension of `width`: BLOCK when it divides, else the whole row."""
    return BLOCK if width % BLOCK == 0 else width


def quantize_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., n] -> (codes [.., n / block, block] e4m3, scales [.., n / block, 1] fp32), x ~= codes * scales:
    `longvu.fp8.quantize`'s per-row scales, each block of `block` values a row."""
    return quantize(x.reshape(*x.shape[:-1], x.shape[-1] // block, block))


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """quantize_blocks' (codes, scales) -> the values in `dtype`, [.., n / block, block]."""
    return (codes.float() * scales).to(dtype)


class Fp8Held:
    """A tensor held as e4m3 codes and per-block fp32 scales (`tensors`: what it keeps)."""

    __slots__ = ("codes", "scales", "dtype", "shape")

    def __init__(self, t: torch.Tensor):
        block = block_size(t.shape[-1])
        if runs_triton(t):
            from longvu.triton_kernels import quantize_rows

            codes, scales = quantize_rows(t.detach().reshape(-1, block))
            self.codes, self.scales = codes.reshape(*t.shape[:-1], -1, block), scales.reshape(*t.shape[:-1], -1, 1)
        else:
            self.codes, self.scales = compiled_on_gpu("fp8_blocks", quantize_blocks, t.detach(), block)
        self.dtype, self.shape = t.dtype, t.shape

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.codes, self.scales

    def value(self, shape: torch.Size | None = None) -> torch.Tensor:
        shape = self.shape if shape is None else shape
        if runs_triton(self.codes):
            from longvu.triton_kernels import dequantize_rows

            block = self.codes.shape[-1]
            return dequantize_rows(self.codes.reshape(-1, block), self.scales.reshape(-1, 1), self.dtype).reshape(shape)
        return compiled_on_gpu("fp8_unblocks", dequantize_blocks, self.codes, self.scales, self.dtype).reshape(shape)


class Rebuilt:
    """A tensor rebuilt as `fn(*args)`; an argument may itself be an Fp8Held (`tensors`: what it keeps)."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable[..., torch.Tensor], *args):
        self.fn, self.args = fn, args

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for a in self.args for t in (a.tensors if isinstance(a, Fp8Held) else (a,)))

    def value(self, shape: torch.Size) -> torch.Tensor:
        args = [a.value() if isinstance(a, Fp8Held) else a for a in self.args]
        with torch.no_grad():
            return self.fn(*args).reshape(shape)


def _key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.numel(), t.dtype


class _Registry:
    """The tensors one kept layer's forward has produced that can be held for less, by storage."""

    def __init__(self):
        self.recipes: dict[tuple, Fp8Held | Rebuilt] = {}
        self.tensors: list[torch.Tensor] = []  # alive while registered: no address reused meanwhile

    def add(self, t: torch.Tensor, recipe: Fp8Held | Rebuilt) -> None:
        self.recipes[_key(t)] = recipe
        self.tensors.append(t)

    def close(self) -> None:
        """Forget everything: autograd holds on to the pack hook (and so to this registry) as long as
        it holds what was packed, so registered tensors must not stay reachable from here."""
        self.recipes.clear()
        self.tensors.clear()

    def pack(self, t: torch.Tensor):
        """A registered tensor -> (its recipe, its shape); any other -> itself, detached: an op's output
        that its own backward saves would otherwise hold that backward node, which holds it, and a
        graph dropped without its backward (a forward whose loss is discarded) would never be freed."""
        recipe = self.recipes.get(_key(t)) if t.is_contiguous() else None
        return t.detach() if recipe is None else (recipe, t.shape)

    @staticmethod
    def unpack(saved):
        if isinstance(saved, torch.Tensor):
            return saved
        recipe, shape = saved
        return recipe.value(shape)


def _layer_forward(self, *args, **kwargs):
    """A kept decoder layer's forward under its registry's saved-tensor hooks (module docstring)."""
    if not torch.is_grad_enabled():
        return type(self).forward(self, *args, **kwargs)
    registry = _Registry()
    _active.append(registry)
    try:
        with saved_tensors_hooks(registry.pack, registry.unpack):
            return type(self).forward(self, *args, **kwargs)
    finally:
        _active.pop().close()


def _norm_registers_output(norm: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Forward hook of a kept layer's RMSNorm: its output is rebuilt from its input."""
    if _active and torch.is_grad_enabled():
        _active[-1].add(output, Rebuilt(types.MethodType(_norm_again, norm), args[0]))


def _norm_again(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's own forward on `x`, without module hooks; its weight must be whole (ZeRO-3 releases it
    before the backward pass, so the plan does not rebuild norm outputs there)."""
    if norm.weight.numel() != x.shape[-1]:
        raise RuntimeError(f"rebuilding an RMSNorm output: its weight holds {norm.weight.numel()} of {x.shape[-1]} "
                           "values (partitioned by ZeRO-3); set training.recompute_norm_outputs false")
    return norm.forward(x)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Qwen2 MLP forward, [.., H] -> [.., H]; inside a kept layer, gate and up are registered to be
    held in FP8 (`self.holds_fp8`) and the product to be rebuilt (`self.holds_product`)."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    registry = _active[-1] if _active and torch.is_grad_enabled() else None
    factors = (gate, up)
    if registry is not None and self.holds_fp8:  # before the product, whose backward saves them
        factors = (Fp8Held(gate), Fp8Held(up))
        registry.add(gate, factors[0])
        registry.add(up, factors[1])
    product = self.swiglu_product(gate, up)
    if registry is not None and self.holds_product:
        registry.add(product, Rebuilt(self.swiglu_product, *factors))
    return self.down_proj(product)


def _unfused_product(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """transformers' own `act_fn(gate) * up` of the MLP `self`."""
    return self.act_fn(gate) * up


def liger_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Liger's fused SiLU-multiply (the kernel `longvu.kernels` patches in)."""
    from liger_kernel.ops import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(gate, up)


def set_kept_layer_saving(layer: nn.Module, *, kept: bool, fused: bool, product: bool = True,
                          norm_outputs: bool = False, fp8_mlp: bool = False) -> None:
    """Set what the Qwen2 decoder layer `layer` (input_layernorm, post_attention_layernorm, mlp) holds:
    when `kept` (it keeps its activations), `product` / `norm_outputs` / `fp8_mlp` as in the module
    docstring; otherwise everything autograd saves. `fused`: Liger's kernels are applied
    (`longvu.kernels`), so the product is rebuilt with Liger's kernel, else with transformers'."""
    mlp = layer.mlp
    mlp.swiglu_product = liger_product if fused else types.MethodType(_unfused_product, mlp)
    mlp.holds_product, mlp.holds_fp8 = kept and product, kept and fp8_mlp
    mlp.forward = types.MethodType(_mlp_forward, mlp)
    for handle in layer.__dict__.pop("_norm_hooks", ()):
        handle.remove()
    if kept and norm_outputs:
        layer._norm_hooks = [norm.register_forward_hook(_norm_registers_output)
                             for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
    if kept and (product or norm_outputs or fp8_mlp):
        layer.forward = types.MethodType(_layer_forward, layer)
    else:
        layer.__dict__.pop("forward", None)
