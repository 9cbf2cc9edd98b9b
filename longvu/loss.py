"""Causal-LM cross-entropy without materialising full-vocabulary fp32 logits for the whole sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from longvu.constants import IGNORE_INDEX


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head_weight: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Mean next-token cross-entropy. hidden [B, S, H], labels [B, S] (IGNORE_INDEX = not scored).

    Only supervised positions are projected, `chunk_size` rows at a time, each chunk recomputed in the
    backward pass (so at most one chunk of fp32 logits [chunk, V] is alive). Divides by
    `num_items_in_batch` when given (gradient accumulation), else by the number of scored tokens."""
    targets = labels[:, 1:].reshape(-1)
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    scored = targets != IGNORE_INDEX
    rows, targets = rows[scored], targets[scored]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        h, t = rows[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, h, lm_head_weight, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, lm_head_weight, t)
    denom = num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return total / denom
