"""The spatiotemporal compression pipeline as plain tensor functions (spec §3.2).

1. `window_mean_similarity` + `select_frames`: temporal reduction on DINO features (windows of 16,
   mean cosine within the window, middle frame kept, cap of 400 frames).
2. `visual_budget`, `item_token_budget`, `frame_budget`, `choose_regime`: the integer budget formulas
   (`visual_token_bound`: the same budget seen from metadata, for the data side's length estimates).
3. `mix_resolutions`: question-guided choice of the frames that get the high-res grid.
4. `spatial_token_compression`: chunks of 8 frames, tokens close to the chunk's first frame dropped,
   then a trim from the end of every chunk to fit the budget.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
import torch.nn.functional as F


def window_mean_similarity(features: torch.Tensor, window: int) -> torch.Tensor:
    """Mean cosine similarity of each frame to the frames of its window (itself included).

    features [F, ...] (flattened per frame) -> [F] float32; windows are consecutive runs of `window`
    frames, the last one shorter. The middle frame of each window (index len // 2) gets 0."""
    n = features.shape[0]
    flat = features.reshape(n, -1).float()
    flat = flat / flat.norm(dim=1, keepdim=True)
    n_win = math.ceil(n / window)
    padded = F.pad(flat, (0, 0, 0, n_win * window - n)).view(n_win, window, -1)
    gram = padded @ padded.transpose(1, 2)  # [W, w, w]; padded rows/cols are 0
    lengths = torch.full((n_win,), window, device=flat.device)
    lengths[-1] = n - (n_win - 1) * window
    sims = gram.sum(-1) / lengths[:, None]
    sims[torch.arange(n_win, device=flat.device), lengths // 2] = 0.0
    return sims.reshape(-1)[:n]


def cap_frames(indices: torch.Tensor, cap: int) -> torch.Tensor:
    """Uniformly subsample to `cap` entries with the reference's `int(i * n / cap)` rule."""
    n = indices.numel()
    if n <= cap:
        return indices
    picks = (torch.arange(cap, dtype=torch.float64) * (n / float(cap))).long()
    return indices[picks.to(indices.device)]


def select_frames(similarity: torch.Tensor, threshold: float, cap: int) -> torch.Tensor:
    """Indices (ascending) of frames with window similarity < threshold, capped at `cap` -> [K] long."""
    kept = torch.nonzero(similarity < threshold).squeeze(1)
    return cap_frames(kept, cap)


def visual_budget(max_length: int, reserve: int, text_len: int) -> int:
    """Visual tokens allowed next to `text_len` text tokens (may be negative, as in the reference)."""
    return max_length - text_len - reserve


def item_token_budget(config, text_len: int, n_items: int = 1) -> int:
    """Visual tokens each of a sample's `n_items` media items may take next to `text_len` text tokens
    (placeholders excluded for the token budget, included for the regime budget, as the model counts):
    `tokenizer_model_max_length - inference_max_length - text_len`, shared equally between items."""
    budget = visual_budget(config.tokenizer_model_max_length, config.inference_max_length, text_len)
    return budget // n_items if n_items > 1 else budget


def frame_token_bound(image_token_len: int, height: int | None, width: int | None) -> int:
    """Upper bound on one frame's visual tokens, newlines included: unpadding a `height x width` frame
    keeps about `side * short / long` rows (+1 for rounding) of the `side x side` grid, one newline per
    row; either orientation (the compat switch reads decoded video sizes swapped). 600 for a square at 576."""
    side = math.isqrt(image_token_len)
    if side * side != image_token_len:
        raise ValueError(f"image_token_len must be a square number, got {image_token_len}")
    if not height or not width or height <= 0 or width <= 0:
        short = side
    else:
        short = min(side, math.ceil(side * min(height, width) / max(height, width)) + 1)
    return max(side * (short + 1), short * (side + 1))


def visual_token_bound(config, kind: str, n_frames: int, height: int | None, width: int | None,
                       text_len: int, n_items: int = 1) -> int:
    """Upper bound on the visual tokens of one media item, from metadata only (the data side's length
    estimate): an image keeps its per-frame tokens; a video is shrunk by the model (frame reduction,
    low-res, dropping) until it fits `item_token_budget`, so it takes at most that."""
    per_frame = frame_token_bound(config.image_token_len, height, width)
    if kind == "image":
        return per_frame * max(1, n_frames)
    return min(max(0, item_token_budget(config, text_len, n_items)), max(0, n_frames) * per_frame)


def frame_budget(budget: int, tokens_per_frame: int) -> int:
    """Frames that fit a budget at a nominal per-frame cost; at least 1."""
    return max(1, budget // tokens_per_frame)


class Regime(str, Enum):
    HIGH = "high"  # every frame on the high-res grid
    MIX = "mix"  # low-res everywhere, question-relevant frames upgraded


def choose_regime(n_frames: int, budget: int, hi_tokens: int, lo_tokens: int) -> Regime:
    """Reference rule: few frames (< budget // hi) or many (> budget // lo) -> HIGH, else MIX.

    hi_tokens / lo_tokens are the nominal per-frame counts without newlines (144 / 64)."""
    if n_frames < frame_budget(budget, hi_tokens) or n_frames > frame_budget(budget, lo_tokens):
        return Regime.HIGH
    return Regime.MIX


def highres_frame_count(budget: int, n_frames: int, lo_per_frame: int, hi_per_frame: int) -> int:
    """How many frames can be upgraded from low to high res within `budget` (0 if none)."""
    lo_total = n_frames * lo_per_frame
    step = hi_per_frame - lo_per_frame
    if budget <= lo_total or step <= 0:
        return 0
    return min((budget - lo_total) // step, n_frames)


def frame_text_scores(lowres: torch.Tensor, text: torch.Tensor, dot_product: bool) -> torch.Tensor:
    """lowres [F, T, C] frame tokens, text [L, C] embeddings -> [F] relevance scores.

    dot_product=True: mean over tokens and text of raw dot products (the trained-in behaviour);
    else the cosine between the frame's mean token and the text's mean embedding."""
    frame_mean = lowres.float().mean(dim=1)
    text_mean = text.float().mean(dim=0)
    if dot_product:
        return frame_mean @ text_mean
    return F.cosine_similarity(frame_mean, text_mean[None], dim=-1)


def mix_resolutions(lowres: torch.Tensor, highres: torch.Tensor, upgraded: torch.Tensor) -> torch.Tensor:
    """Frames listed in `upgraded` take their high-res tokens, the others stay low-res; temporal order kept.

    lowres [F, Tl, C], highres [F, Th, C], upgraded [k] frame indices -> [(F-k)*Tl + k*Th, C]."""
    n, t_lo, c = lowres.shape
    t_hi = highres.shape[1]
    is_high = torch.zeros(n, dtype=torch.bool, device=lowres.device)
    is_high[upgraded] = True
    frame = torch.arange(n, device=lowres.device)
    keep_lo = (~is_high).repeat_interleave(t_lo)
    keep_hi = is_high.repeat_interleave(t_hi)
    rows = torch.cat([lowres.reshape(-1, c)[keep_lo], highres.reshape(-1, c)[keep_hi]])
    frame_of = torch.cat([frame.repeat_interleave(t_lo)[keep_lo], frame.repeat_interleave(t_hi)[keep_hi]])
    return rows[torch.sort(frame_of, stable=True).indices]


def spatial_token_compression(frames: torch.Tensor, threshold: float, budget: int, chunk: int = 8) -> torch.Tensor:
    """STC: frames [F, T, C] -> kept tokens [M, C].

    In each chunk of `chunk` frames, the first frame keeps every token; a token of another frame is
    kept iff its cosine with the same position in the chunk's first frame is < threshold. If more than
    `budget` tokens remain, ceil(excess / n_chunks) tokens are cut from the end of every chunk, and the
    result is sliced `[:budget]` (Python slicing, so a negative budget cuts from the end)."""
    n, t, c = frames.shape
    anchors = frames[torch.arange(n, device=frames.device) // chunk * chunk]
    keep = F.cosine_similarity(frames, anchors, dim=-1) < threshold  # [F, T]
    keep[::chunk] = True
    flat_keep = keep.reshape(-1)
    tokens = frames.reshape(-1, c)[flat_keep]
    n_chunks = math.ceil(n / chunk)
    chunk_of = (torch.arange(n * t, device=frames.device) // (chunk * t))[flat_keep]
    counts = torch.bincount(chunk_of, minlength=n_chunks)
    total = int(counts.sum())
    if total > budget:
        cut = math.ceil((total - budget) / n_chunks)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(total, device=frames.device) - starts[chunk_of]
        tokens = tokens[position < (counts - cut)[chunk_of]]
    return tokens[:budget]
