"""A LoRA layer over a frozen base as one autograd op.

peft's `lora.Linear` computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` through four module
calls and five autograd nodes; its backward scales the gradient in a pass of its own and sums the
input's two gradient terms in another. On the 7B LLM at 8K tokens that is 196 such layers a step,
and the step's forward was bound by the host's time issuing them (on an H200: 267 ms of CPU time for
164 ms of GPU work; 111 ms for 154 ms fused). `FusedLoraLinear` (the same
module, its class swapped; parameter names, adapters and merges are peft's) runs the common case of
training as one autograd Function, x [M, in] -> out [M, out]:

    forward   h = drop(x) @ A.T                          [M, r], kept (peft keeps it too, as lora_B's input)
              out = base(x) + scaling * h @ B.T          the adapter's sum in the GEMM's epilogue (addmm)
    backward  grad_h = scaling * grad @ B                [M, r]
              B.grad = scaling * grad.T @ h,  A.grad = grad_h.T @ drop(x)
              x.grad = base's input gradient + drop(grad_h @ A), summed inside the dropout pass
                       (`longvu.lora_dropout.dropped_pair`) or, without dropout, in an addmm's epilogue

drop(x) is `longvu.lora_dropout`'s: drawn again from its seed in the backward, never kept. The base
is a frozen `nn.Linear` or a `longvu.fp8.Fp8FrozenLinear` (its matmuls in FP8, its input's rows
shared with the layers that read the same input). Everything else takes peft's own forward: merged
or disabled adapters, several active adapters, per-call adapter names, DoRA and other variants,
adapter biases, dtype casts, autocast, 4-bit bases, and parameters DeepSpeed ZeRO-3 partitions
(gathered by hooks on module calls, which this path does not make).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners import lora
from torch import nn

from longvu.fp8 import Fp8FrozenLinear, fp8_input_grad, fp8_matmul
from longvu.lora_dropout import DropoutLoraA, draw_seed, dropped, dropped_pair


def _frozen_linear_weight(base: nn.Module) -> torch.Tensor | None:
    """The full-precision weight of a frozen plain `nn.Linear` base, else None."""
    if type(base) is not nn.Linear or base.weight.requires_grad or type(base.weight) is not nn.Parameter:
        return None
    if base.bias is not None and base.bias.requires_grad:
        return None
    return base.weight


class _LoraOverFrozen(torch.autograd.Function):
    """x2d [M, in] -> base(x2d) + scaling * drop(x2d) @ A.T @ B.T [M, out] (module docstring); `rows`:
    x2d's FP8 rows and their scales when the base is an Fp8FrozenLinear, else None."""

    @staticmethod
    def forward(ctx, x2d, weight_a, weight_b, base, rows, row_scale, p: float, seed: int, scaling: float):
        if rows is None:
            out = F.linear(x2d, base.weight, base.bias)
        else:
            out = fp8_matmul(rows, row_scale, base.weight_fp8, base.weight_scale, base.bias, x2d.dtype)
        h = F.linear(dropped(x2d, p, seed) if p > 0 else x2d, weight_a)
        out.addmm_(h, weight_b.t(), alpha=scaling)
        ctx.save_for_backward(x2d, weight_a, weight_b, h)
        ctx.base, ctx.fp8, ctx.p, ctx.seed, ctx.scaling = base, rows is not None, p, seed, scaling
        return out

    @staticmethod
    def backward(ctx, grad):
        x2d, weight_a, weight_b, h = ctx.saved_tensors
        want_x, want_a, want_b = ctx.needs_input_grad[:3]
        p, seed, base = ctx.p, ctx.seed, ctx.base
        grad_b = torch.mm(grad.t(), h).mul_(ctx.scaling) if want_b else None
        grad_h = torch.mm(grad, weight_b).mul_(ctx.scaling) if want_x or want_a else None
        grad_x = dropped_x = None
        if want_x:
            base_grad = fp8_input_grad(grad, base.weight_fp8, base.weight_scale) if ctx.fp8 else grad @ base.weight
            if p == 0:
                grad_x = base_grad.addmm_(grad_h, weight_a)
            elif want_a:
                dropped_x, grad_x = dropped_pair(x2d, grad_h @ weight_a, p, seed, accumulate=base_grad)
            else:
                grad_x = dropped(grad_h @ weight_a, p, seed).add_(base_grad)
        if want_a and dropped_x is None:
            dropped_x = dropped(x2d, p, seed) if p > 0 else x2d
        grad_a = torch.mm(grad_h.t(), dropped_x) if want_a else None
        return grad_x, grad_a, grad_b, None, None, None, None, None, None


def _partitioned(t: torch.Tensor) -> bool:
    return hasattr(t, "ds_id")  # a DeepSpeed ZeRO-3 parameter: whole only inside its module's call


class FusedLoraLinear(lora.Linear):
    """peft's `lora.Linear` whose forward runs training's common case as `_LoraOverFrozen`."""

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one active adapter when the fused path applies to this call (module docstring), else None."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant or not isinstance(self.lora_dropout[name], nn.Identity):
            return None
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        if type(lora_a) not in (nn.Linear, DropoutLoraA) or type(lora_b) is not nn.Linear:
            return None
        if lora_a.bias is not None or lora_b.bias is not None or torch.is_autocast_enabled(x.device.type):
            return None
        if not x.dtype == lora_a.weight.dtype == lora_b.weight.dtype or x.shape[-1] != lora_a.in_features:
            return None
        if _partitioned(lora_a.weight) or _partitioned(lora_b.weight):
            return None
        base = self.base_layer
        if isinstance(base, Fp8FrozenLinear):
            return name
        weight = _frozen_linear_weight(base)
        return name if weight is not None and weight.dtype == x.dtype and not _partitioned(weight) else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        lora_a, lora_b, base = self.lora_A[name], self.lora_B[name], self.base_layer
        p = lora_a.p if isinstance(lora_a, DropoutLoraA) and lora_a.training else 0.0
        x2d = x.reshape(-1, x.shape[-1])
        rows, row_scale = base.input_rows(x, x2d) if isinstance(base, Fp8FrozenLinear) else (None, None)
        out = _LoraOverFrozen.apply(x2d, lora_a.weight, lora_b.weight, base, rows, row_scale, p,
                                    draw_seed() if p > 0 else 0, float(self.scaling[name]))
        return out.reshape(*x.shape[:-1], out.shape[-1])


def fuse_lora_layers(model: nn.Module) -> int:
    """Swap every peft `lora.Linear` under `model` (that exact class) for FusedLoraLinear, in place ->
    how many were swapped."""
    swapped = 0
    for module in model.modules():
        if type(module) is lora.Linear:
            module.__class__ = FusedLoraLinear
            swapped += 1
    return swapped
