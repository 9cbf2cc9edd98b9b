"""Fused kernels for the Qwen2 language model (`training.fused_kernels: auto | liger | none`).

`liger`: Liger's RMSNorm, SwiGLU and RoPE kernels patched into the LLM's decoder layers, and the
`lm_head` computing the loss with Liger's fused linear cross-entropy (no logits materialised). Needs
the liger-kernel package (the `gpu` extra) and a CUDA GPU; imported only when applied.
`none`: the unfused path, with our chunked loss (longvu.loss). `auto`: `liger` when installed and on
a GPU, else `none`. The towers and the connector are untouched.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

CHOICES = ("auto", "liger", "none")
_triton_passes = True  # training.triton_kernels (set_triton_passes)


def set_triton_passes(enabled: bool) -> None:
    """`training.triton_kernels`: whether LoRA dropout and the FP8 (de)quantizations on a GPU run as
    longvu.triton_kernels (True) or as the PyTorch ops they replace."""
    global _triton_passes
    _triton_passes = bool(enabled)


def runs_triton(t: torch.Tensor) -> bool:
    """Whether work on `t` runs as longvu.triton_kernels: on a CUDA GPU unless switched off, and on the
    CPU only under Triton's interpreter (TRITON_INTERPRET=1, as the tests run them)."""
    return _triton_passes and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def check_choice(choice: str) -> None:
    """Raise ValueError (one line) for an unknown choice, or `liger` without the package installed."""
    if choice not in CHOICES:
        raise ValueError(f"training.fused_kernels {choice!r}: choose from {', '.join(CHOICES)}")
    if choice == "liger" and not liger_installed():
        raise ValueError("training.fused_kernels 'liger': the liger-kernel package is not installed "
                         "(pip install 'longvu-train[gpu]', or choose auto or none)")


def resolve_fused_kernels(choice: str, device: torch.device) -> str:
    """`choice` for this process's device -> "liger" or "none"."""
    check_choice(choice)
    if choice == "liger" and device.type != "cuda":
        raise ValueError(f"training.fused_kernels 'liger': Liger's Triton kernels need a CUDA GPU, not {device}")
    if choice == "auto":
        return "liger" if liger_installed() and device.type == "cuda" else "none"
    return choice


class FusedCrossEntropyHead(nn.Linear):
    """An `lm_head` that, called with targets, returns the summed cross-entropy from Liger's fused
    linear cross-entropy instead of logits. hidden [N, H], targets [N] -> scalar fp32; without
    targets, logits [..., V] as nn.Linear. A call of the module itself, so ZeRO-3 gathers its weight."""

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(self.weight, hidden, targets, self.bias).float()


def apply_fused_kernels(model, kernels: str) -> None:
    """Patch a LongVUForCausalLM (the model itself, also under a peft wrapper) with the resolved
    `kernels` ("liger" | "none")."""
    if kernels == "none":
        return
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2

    # the loss is not Qwen2ForCausalLM's: the fused cross-entropy goes through our lm_head instead
    apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)
    model.lm_head.__class__ = FusedCrossEntropyHead
