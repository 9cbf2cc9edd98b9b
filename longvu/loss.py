"""Causal-LM cross-entropy without materialising full-vocabulary fp32 logits for the whole sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from longvu.constants import IGNORE_INDEX
from longvu.kernels import FusedCrossEntropyHead


def _chunk_loss_sum(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def _chunked_loss_sum(rows: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, n_chunks: int) -> torch.Tensor:
    """Summed cross-entropy of rows [N, H] against targets [N], `n_chunks` lm_head calls, each recomputed."""
    total = rows.new_zeros((), dtype=torch.float32)
    per_chunk = -(-targets.numel() // n_chunks)
    for i in range(n_chunks):
        h, t = rows[i * per_chunk:(i + 1) * per_chunk], targets[i * per_chunk:(i + 1) * per_chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, h, lm_head, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, lm_head, t)
    return total


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    num_items_in_batch: int | torch.Tensor | None = None,
    n_chunks: int = 8,
) -> torch.Tensor:
    """Mean next-token cross-entropy. hidden [B, S, H], labels [B, S] (IGNORE_INDEX = not scored).

    Only supervised positions are projected, in `n_chunks` equal slices, each recomputed in the backward
    pass, so at most one slice of fp32 logits [rows / n_chunks, V] is alive. The number of `lm_head`
    calls is fixed (ZeRO-3 ranks must call a module equally often). Divides by `num_items_in_batch` when
    given (gradient accumulation), else by the number of scored tokens. A `FusedCrossEntropyHead`
    (longvu.kernels, `fused_kernels: liger`) computes the sum in one fused call instead."""
    targets = labels[:, 1:].reshape(-1)
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    scored = targets != IGNORE_INDEX
    rows, targets = rows[scored], targets[scored]
    if isinstance(lm_head, FusedCrossEntropyHead):
        total = lm_head(rows, targets) if targets.numel() else lm_head(hidden[:, :1].flatten(0, 1)).float().sum() * 0.0
    else:
        total = _chunked_loss_sum(rows, targets, lm_head, n_chunks)
    denom = num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return total / denom
