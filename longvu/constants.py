"""Constants shared by the model library, the data pipeline and training (no torch: the pre-launch
check reads manifests through these)."""

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
IMAGE_PLACEHOLDERS = ("<image>", "<video>")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2 special tokens (ids as in the released tokenizer).
QWEN_ENDOFTEXT_ID = 151643  # also the pad token
QWEN_IM_START_ID = 151644
QWEN_IM_END_ID = 151645
QWEN_TOKENIZER_LEN = 151646  # rows of the embedding that real tokens can reach
QWEN_ASSISTANT_HEADER_IDS = (151644, 77091, 198)  # "<|im_start|>assistant\n"

# Per-tower preprocessing: pad colour is int(255 * mean), as the reference does.
SIGLIP_IMAGE_SIZE = 384
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
DINO_IMAGE_SIZE = 378
DINO_MEAN = (0.485, 0.456, 0.406)
DINO_STD = (0.229, 0.224, 0.225)

# `longvu.tiny` families (`model.init: tiny:FAMILY`): name -> the connector/compression fields that
# define it. Here, not in longvu.tiny, so that checking a run config imports no torch.
TINY_FAMILIES = {
    # the released video checkpoint's shape: 144 queries (2x2 cells, pos_embed), hi/lo-res mixing
    "video": dict(image_token_len=144, highres=True),
    # the `_img` checkpoint's shape: 576 queries (1x1 cells, no pos_embed), high-res off
    "image": dict(image_token_len=576, highres=False),
    # 144 queries without the hi/lo mixing
    "video_highres_off": dict(image_token_len=144, highres=False),
}


def count_placeholders(text: str) -> int:
    """Number of ``<image>``/``<video>`` placeholders in ``text``."""
    return sum(text.count(p) for p in IMAGE_PLACEHOLDERS)
