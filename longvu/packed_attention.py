"""`sdpa_varlen`: SDPA, except that a packed row runs PyTorch's variable-length FlashAttention.

A packed row (`data.packing`) holds several samples, each attending only to itself. Under plain SDPA
that needs a dense [T, T] block mask, which rules out the flash kernel: the masked kernel computes
all T^2 scores of the row (not the sum of each sample's causal triangle) and, on cuDNN, builds a
plan for each new row length. `torch.nn.attention.varlen.varlen_attn` (CUDA only) takes the samples' bounds
instead (`cu_seq_lens`), as `flash_attention_2` does with the flash-attn package.

The LLM's attention reads the bounds from the keyword arguments HF passes down to the attention
function (`cu_seq_lens_q/k`, `max_length_q/k`, the names of HF's flash-attention kwargs), and the
forward then hands HF no mask to build (`NO_MASKS`); anything else -- unpacked batches, padding
masks, generation with a KV cache -- is plain SDPA, with SDPA's own mask, so the implementation is a
drop-in for `sdpa`.
"""

from __future__ import annotations

import importlib.util
import inspect
from functools import lru_cache

import torch

VARLEN_ATTENTION = "sdpa_varlen"
# Qwen2Model takes a dict of per-layer-type masks as given: with the bounds, none is built
NO_MASKS = {"full_attention": None, "sliding_attention": None}


def varlen_available() -> bool:
    """Whether this torch has `torch.nn.attention.varlen` and a CUDA device to run it."""
    return torch.cuda.is_available() and importlib.util.find_spec("torch.nn.attention.varlen") is not None


def packed_attention_kwargs(lengths: list[int], device: torch.device) -> dict:
    """The keyword arguments that make the LLM's attention treat one row as `lengths` samples:
    cu_seq_lens_q/k int32 [len(lengths) + 1] on `device`, max_length_q/k host ints (no device sync)."""
    bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device, non_blocking=True)
    longest = max(lengths)
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


@lru_cache(maxsize=1)
def _kernel():
    """varlen_attn and the names of its parameters: torch 2.11's takes window_size and scale, later
    ones also enable_gqa, earlier ones only is_causal."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _flash_varlen(query, key, value, bounds, longest: int, scale: float, window: int | None = None) -> torch.Tensor:
    """Causal attention within each [bounds[i], bounds[i+1]) span, over the last `window` keys if given
    (HF's sliding window: the query's own position and window - 1 before it): query [T, Hq, D],
    key/value [T, Hkv, D] (Hq a multiple of Hkv) -> [T, Hq, D]."""
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{VARLEN_ATTENTION}: the varlen flash kernel runs in fp16 or bf16, not {query.dtype}")
    varlen_attn, params = _kernel()
    if "window_size" in params:
        options = {"window_size": (-1 if window is None else window - 1, 0)}
    elif window is None:
        options = {"is_causal": True}
    else:
        raise ValueError(f"{VARLEN_ATTENTION}: this torch's varlen_attn has no window_size for a sliding window")
    if "enable_gqa" in params:
        options["enable_gqa"] = key.shape[1] != query.shape[1]
    elif key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if "scale" in params:
        options["scale"] = scale
    elif scale != query.shape[-1] ** -0.5:  # the kernel's fixed 1/sqrt(D)
        query = query * (scale * query.shape[-1] ** 0.5)
    return varlen_attn(query, key, value, bounds, bounds, longest, longest, **options)


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """HF attention function. query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None).
    With `cu_seq_lens_q` (a packed row, B = 1) the variable-length kernel, else SDPA."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or dropout or attention_mask is not None or kwargs.get("max_length_q") is None:
        raise ValueError(f"{VARLEN_ATTENTION}: a packed row is one batch row with cu_seq_lens_q and max_length_q, "
                         f"no mask and no attention dropout (got batch {query.shape[0]}, max_length_q "
                         f"{kwargs.get('max_length_q')}, mask {attention_mask is not None}, dropout {dropout})")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    rows = [t[0].transpose(0, 1).contiguous() for t in (query, key, value)]  # [T, H, D]
    out = _flash_varlen(*rows, bounds, int(kwargs["max_length_q"]), scale, kwargs.get("sliding_window"))
    return out[None], None


def register() -> None:
    """Make `sdpa_varlen` a valid `attn_implementation` (its masks are SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, sdpa_varlen_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
