"""Sequence-length estimates from metadata only (no decoding), for the sampler and the validator.

Visual tokens (upper bound, after the model's token budget):

- tokens per frame = ``rows * (cols + 1)``: the SVA grid is ``side x side`` with
  ``side = sqrt(image_token_len)`` (24 for 576, 12 for 144); unpadding a non-square frame keeps
  about ``side * short/long`` rows (+1 for rounding) of the padded square, and each row gets one
  newline token. Either orientation is allowed for (the original checkpoints unpad the wrong axis),
  so the larger of the two is used. A square frame at 576 gives 24 * 25 = 600.
- an image: its tokens per frame (images are never compressed by the budget);
- a video: ``min(budget, frames * tokens_per_frame)`` with ``budget = model_max_length - 16 -
  text_len``, because the model shrinks video tokens (frame reduction, low-res, dropping) until
  they fit the budget. ``lowres_token``/``highres`` do not raise the bound: upgrades to high
  resolution only happen while the budget allows.

Text tokens are estimated from the characters (about 3 characters per token, an over-estimate for
English with the Qwen2 BPE) plus the chat template's fixed tokens, unless exact counts are given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from longvu.processing import FrameSize

CHARS_PER_TOKEN = 3.0
TEMPLATE_TOKENS_PER_TURN = 5  # <|im_start|>, role, "\n", <|im_end|>, "\n"
SYSTEM_TOKENS = 13  # the system turn with "You are a helpful assistant."
BUDGET_MARGIN = 16  # the model's reserved tokens


@dataclass
class TokenConfig:
    """The model numbers the estimate needs."""

    image_token_len: int = 144
    lowres_token: int = 8
    highres: bool = True
    model_max_length: int = 8192


def tokens_per_frame(frame_size: FrameSize | None, image_token_len: int) -> int:
    """Upper bound on the tokens of one frame, newline tokens included."""
    side = math.isqrt(image_token_len)
    if side * side != image_token_len:
        raise ValueError(f"image_token_len must be a square number, got {image_token_len}")
    if frame_size is None or frame_size.height <= 0 or frame_size.width <= 0:
        short = side
    else:
        short = min(side, math.ceil(side * min(frame_size) / max(frame_size)) + 1)
    return max(side * (short + 1), short * (side + 1))


def estimate_visual_tokens(n_frames: int, frame_size: FrameSize | None, image_token_len: int,
                           lowres_token: int, highres: bool, model_max_length: int, text_len: int,
                           kind: str = "video") -> int:
    """Upper bound on the visual tokens of one media item (see the module docstring)."""
    del lowres_token, highres  # documented: they do not change the upper bound
    per_frame = tokens_per_frame(frame_size, image_token_len)
    if kind == "image":
        return per_frame * max(1, n_frames)
    budget = max(0, model_max_length - BUDGET_MARGIN - text_len)
    return min(budget, max(0, n_frames) * per_frame)


def estimate_text_tokens(conversations: list[dict]) -> int:
    """Cheap over-estimate of the text tokens of a conversation (system turn included)."""
    chars = sum(len(t.get("value", "")) for t in conversations)
    return SYSTEM_TOKENS + TEMPLATE_TOKENS_PER_TURN * len(conversations) + math.ceil(chars / CHARS_PER_TOKEN)
