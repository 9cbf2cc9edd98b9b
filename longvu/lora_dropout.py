"""LoRA's input dropout without its activation memory.

peft computes an adapter as `lora_B(lora_A(dropout(x)))`: autograd then keeps, for every adapted
layer, the dropped copy of `x` (lora_A's input) and dropout's mask, on top of `x` itself, which the
layer keeps anyway. For the 7B LLM with LoRA r=64 on every linear layer at 8K tokens, folding them
away took the step's peak from 71.2 to 57.2 GiB on an H200 (~65 KB a token a decoder layer).

`DropoutLoraA` is lora_A with the dropout folded in: it keeps `x` (shared with the layer) and a seed,
and draws the same mask again in the backward pass. The mask is Bernoulli(1 - p), the kept values
scaled by 1 / (1 - p), as `nn.Dropout`; its seed comes from the CPU's default generator, so
recomputation under activation checkpointing (which restores that generator) draws the same mask.
On a GPU (`training.triton_kernels`) the mask is drawn inside one Triton kernel per pass
(`longvu.triton_kernels.dropped`), which applies it as well; elsewhere it is a bool tensor from a
seeded generator, applied by `torch.where`.
Parameter names are unchanged (`lora_A.<adapter>.weight`): checkpoints, adapters and merges are
those of plain peft.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longvu.kernels import runs_triton

_SEED_RANGE = 2**62
_GENERATORS: dict[torch.device, torch.Generator] = {}


def draw_seed() -> int:
    """A dropout mask's seed, from the CPU's default generator: no device sync, and activation
    checkpointing, which restores that generator, draws the same one when it recomputes."""
    return int(torch.randint(_SEED_RANGE, ()).item())


def _keep_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Bool [x.shape]: which elements survive dropout `p`, a pure function of `seed` and the shape."""
    generator = _GENERATORS.get(x.device)
    if generator is None:
        generator = _GENERATORS[x.device] = torch.Generator(device=x.device)
    generator.manual_seed(seed)  # read on the host at launch: reseeding for the next call is safe
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p, generator=generator)


def dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x with dropout `p` applied by the mask `seed` draws (the same mask for any tensor of x's shape)."""
    if runs_triton(x):
        from longvu.triton_kernels import dropped as dropped_kernel

        return dropped_kernel(x, p, seed)
    return torch.where(_keep_mask(x, p, seed), x * (1.0 / (1.0 - p)), 0)


def dropped_pair(x: torch.Tensor, g: torch.Tensor, p: float, seed: int,
                 accumulate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropped(x, p, seed), dropped(g, p, seed)) for tensors of x's shape, one pass on a GPU; with
    `accumulate` (contiguous) the second is added to it in place, and it is returned instead."""
    if runs_triton(x):
        from longvu.triton_kernels import dropped_pair as pair_kernel

        return pair_kernel(x, g, p, seed, accumulate)
    keep, scale = _keep_mask(x, p, seed), 1.0 / (1.0 - p)
    dropped_g = torch.where(keep, g * scale, 0)
    return torch.where(keep, x * scale, 0), dropped_g if accumulate is None else accumulate.add_(dropped_g)


class _DroppedInputLinear(torch.autograd.Function):
    """dropout(x, p) @ weight.T, keeping only `x`, `weight` and the mask's seed for the backward."""

    @staticmethod
    def forward(ctx, x, weight, p: float, seed: int):
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed = p, seed
        return F.linear(dropped(x, p, seed), weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad[:2]
        through_a = grad_out @ weight.to(grad_out.dtype) if want_x else None  # the input's gradient before dropout
        if want_x and want_w:
            dropped_x, grad_x = dropped_pair(x, through_a, ctx.p, ctx.seed)
        else:
            dropped_x = dropped(x, ctx.p, ctx.seed) if want_w else None
            grad_x = dropped(through_a, ctx.p, ctx.seed) if want_x else None
        grad_w = None
        if want_w:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ dropped_x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
            grad_w = grad_w.to(weight.dtype)
        return None if grad_x is None else grad_x.to(x.dtype), grad_w, None, None


class DropoutLoraA(nn.Linear):
    """peft's lora_A [.., in] -> [.., r] (no bias) with its input dropout `p` inside (training mode only)."""

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p > 0):
            return F.linear(x, self.weight, self.bias)
        return _DroppedInputLinear.apply(x, self.weight, self.p, draw_seed())


def fold_lora_dropout(model: nn.Module) -> int:
    """Fold each peft LoRA layer's input dropout (p > 0) into its lora_A (`DropoutLoraA`; the dropout
    becomes an identity). Returns how many adapters were changed."""
    folded = 0
    for module in model.modules():
        dropouts, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict):
            continue
        for adapter, dropout in list(dropouts.items()):
            linear = lora_a[adapter] if adapter in lora_a else None
            if isinstance(dropout, nn.Dropout) and dropout.p > 0 and type(linear) is nn.Linear and linear.bias is None:
                linear.__class__ = DropoutLoraA
                linear.p = float(dropout.p)
                dropouts[adapter] = nn.Identity()
                folded += 1
    return folded
