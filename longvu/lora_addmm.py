"""LoRA's up-projection, its scaling and the sum with the base layer's output as one GEMM.

peft computes a LoRA layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: after lora_B's
matmul, one pass over the [tokens, out] output multiplies it by the scaling and another adds it to
the base output; the backward pass scales the gradient once more. `AddmmLoraB.forward(a, base_out,
scaling)` is `torch.addmm(base_out, a, weight.T, alpha=scaling)`: the GEMM adds the scaled product to
the base output in its epilogue. lora_B is still called as a module, so ZeRO-3 gathers its weight.

Parameter names and state dicts are peft's. A layer runs peft's own forward whenever it does more
than one vanilla adapter (adapters disabled or merged, a mixed-adapter batch, several active
adapters, a variant such as DoRA, a bias on lora_B, dtypes that differ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn


class AddmmLoraB(nn.Linear):
    """peft's lora_B [.., r] -> [.., out]; given the base output and the scaling, returns their sum."""

    def forward(self, a: torch.Tensor, base_out: torch.Tensor | None = None, scaling: float = 1.0) -> torch.Tensor:
        if base_out is None:
            return F.linear(a, self.weight, self.bias)
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), a.reshape(-1, a.shape[-1]), self.weight.t(),
                          alpha=scaling)
        return out.reshape(base_out.shape)


class AddmmLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear whose vanilla single-adapter forward sums through `AddmmLoraB` (module docstring)."""

    def _vanilla_adapter(self, args: tuple, kwargs: dict) -> str | None:
        """The one active vanilla adapter this call can fuse, or None (peft's forward runs instead)."""
        if self.disable_adapters or self.merged or args or any(k != "adapter_names" or v is not None
                                                               for k, v in kwargs.items()):
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant or not isinstance(self.lora_B[active[0]], AddmmLoraB):
            return None
        return active[0] if self.lora_B[active[0]].bias is None else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._vanilla_adapter(args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x)
        result = self.base_layer(x)
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        a = lora_a(self.lora_dropout[adapter](self._cast_input_dtype(x, lora_a.weight.dtype)))
        if not (a.dtype == result.dtype == lora_b.weight.dtype) or not result.is_contiguous():
            return result + lora_b(a) * self.scaling[adapter]
        return lora_b(a, result, self.scaling[adapter])


def fuse_lora_sums(model: nn.Module) -> int:
    """Give every peft LoRA Linear under `model` the fused sum (`AddmmLoraLinear`, its lora_B modules
    `AddmmLoraB`), in place -> the number of layers changed."""
    changed = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            for lora_b in module.lora_B.values():
                if type(lora_b) is nn.Linear:
                    lora_b.__class__ = AddmmLoraB
            module.__class__ = AddmmLoraLinear
            changed += 1
    return changed
