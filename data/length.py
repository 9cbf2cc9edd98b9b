"""Text-length estimates from the conversation alone (no tokenizer), for the sampler's length grouping.

About 3 characters per token (an over-estimate for English with the Qwen2 BPE) plus the chat
template's fixed tokens. Visual tokens come from the model library's own budget:
`longvu.compression.visual_token_bound`, from the model config.
"""

from __future__ import annotations

import math

CHARS_PER_TOKEN = 3.0
TEMPLATE_TOKENS_PER_TURN = 5  # <|im_start|>, role, "\n", <|im_end|>, "\n"
SYSTEM_TOKENS = 13  # the system turn with "You are a helpful assistant."


def estimate_text_tokens(conversations: list[dict]) -> int:
    """Cheap over-estimate of the text tokens of a conversation (system turn included)."""
    chars = sum(len(t.get("value", "")) for t in conversations)
    return SYSTEM_TOKENS + TEMPLATE_TOKENS_PER_TURN * len(conversations) + math.ceil(chars / CHARS_PER_TOKEN)
