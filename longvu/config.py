"""`LongVUConfig`: the Qwen2 language-model config plus the vision, connector and compression fields.

Field names follow the original `cambrian_qwen` config.json where one exists, so an original
config loads unchanged (`LongVUConfig.from_pretrained(original_dir)`); the switches for the
behaviours the released checkpoints were trained with (spec §7) are turned on for such a config.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PretrainedConfig, Qwen2Config

from longvu.constants import QWEN_TOKENIZER_LEN

logger = logging.getLogger(__name__)

ORIGINAL_MODEL_TYPE = "cambrian_qwen"

# Fields of the original config.json that we read under another name, or that carry no meaning here.
_ORIGINAL_ONLY_FIELDS = (
    "mm_vision_select_layer", "mm_vision_select_feature", "connect_layer", "highres_connect",
    "is_st_sampler", "mm_patch_merge_type", "num_of_vision_sampler_layers", "image_position",
    "image_aspect_ratio", "mm_use_im_start_end", "mm_use_im_patch_token", "use_mm_proj",
    "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "is_image_newline",
    "vision_tower_aux_token_len_list", "mm_projector_lr", "mm_vision_sampler_lr", "mm_vision_tower_lr",
    "start_of_vision_sampler_layers", "stride_of_vision_sampler_layers", "architectures",
)

# The behaviours trained into the released checkpoints (spec §7), on for an original config.
COMPAT_SWITCHES = {
    "compat_swap_video_hw": True,  # decoded-video sizes (H, W) are read as (W, H) when unpadding
    "compat_lowres_single_image": True,  # a single image with highres=True gets only the low-res grid
    "compat_dot_product_scoring": True,  # hi-res frames are ranked by raw dot products with the text
}


@strict
class LongVUConfig(Qwen2Config):
    """Qwen2 config + LongVU fields. Sizes in tokens unless named otherwise.

    Towers: `siglip_config` / `dino_config` are the HF vision configs as dicts; `siglip_path` /
    `dino_path` are folders with their weights (used when the towers are not in the checkpoint).
    """

    model_type = "longvu"

    # vision towers
    mm_vision_tower_aux_list: list[str] | None = None
    siglip_config: dict | None = None
    dino_config: dict | None = None
    siglip_path: str | None = None
    dino_path: str | None = None
    siglip_image_size: int = 384
    dino_image_size: int = 378
    mm_vision_tower_aux_token_len_list: list[int] | None = None  # tokens per tower after resize (576)
    compat_dino_legacy_pos_interp: bool = True  # DINOv2 pos-emb interpolation of transformers 4.42

    # connector (SVA) and projector
    mm_projector_type: str = "sva"
    vision_hidden_size: int = 1024
    connector_depth: int = 3
    connector_heads: int = 16
    connector_only: bool = True
    num_query_group: int = 1
    query_num_list: list[int] | None = None
    image_token_len: int = 144

    # compression
    highres: bool = True
    lowres_token: int = 8
    frame_pos: bool = False
    dino_threshold: float = 0.83
    drop_threshold: float = 0.8
    dino_window: int = 16
    max_selected_frames: int = 400
    stc_chunk: int = 8
    tokenizer_model_max_length: int = 8192
    inference_max_length: int = 16  # tokens reserved for the answer in the visual budget
    tokenizer_padding_side: str = "right"

    # compatibility switches (spec §7); off for new models, on for original checkpoints
    compat_swap_video_hw: bool = False
    compat_lowres_single_image: bool = False
    compat_dot_product_scoring: bool = False

    # logits at ids >= this are masked in generation (the original shrank its vocabulary to it)
    generation_vocab_size: int | None = None

    def __post_init__(self, **kwargs):
        if self.mm_vision_tower_aux_list is None:
            self.mm_vision_tower_aux_list = ["siglip/CLIP-ViT-SO400M-14-384", "facebook/dinov2-giant-res378"]
        if self.mm_vision_tower_aux_token_len_list is None:
            self.mm_vision_tower_aux_token_len_list = [576, 576]
        if self.query_num_list is None:
            self.query_num_list = [self.image_token_len]
        super().__post_init__(**kwargs)
        self._check_geometry()

    def _check_geometry(self) -> None:
        if self.mm_projector_type != "sva":
            raise ValueError(f"mm_projector_type={self.mm_projector_type!r}: only 'sva' is supported")
        if self.num_query_group != 1 or len(self.query_num_list) != 1:
            raise ValueError("only one query group is supported (num_query_group=1), as in every released LongVU")
        if not self.connector_only:
            raise ValueError("connector_only=False (in-LLM vision samplers) is not supported")
        if self.frame_pos:
            raise ValueError("frame_pos=True is not supported (disabled, and buggy, in the original)")
        grid = self.tower_grid
        if len(set(self.mm_vision_tower_aux_token_len_list)) != 1 or grid * grid != self.mm_vision_tower_aux_token_len_list[0]:
            raise ValueError(f"tower token lengths {self.mm_vision_tower_aux_token_len_list} must be one square number")
        side = self.query_side
        if side * side != self.query_num_list[0] or grid % side:
            raise ValueError(f"query_num {self.query_num_list[0]} must be a square whose side divides {grid}")
        if self.query_num_list[0] != self.image_token_len:
            raise ValueError(
                f"query_num_list {self.query_num_list} must equal image_token_len {self.image_token_len} "
                "(the original's resize between them is not supported)"
            )
        if self.vision_hidden_size % self.connector_heads:
            raise ValueError(f"vision_hidden_size {self.vision_hidden_size} not divisible by {self.connector_heads} heads")

    def set_query_num(self, query_num: int) -> None:
        """Switch the connector's query grid (576 <-> 144), keeping the fields consistent."""
        if self.image_token_len != query_num:
            logger.info("SVA queries: %d -> %d", self.image_token_len, query_num)
        self.image_token_len = query_num
        self.query_num_list = [query_num]
        self._check_geometry()

    def apply_overrides(self, overrides: dict[str, Any], where: str = "config overrides") -> None:
        """Set model fields by name (`image_token_len` switches the query grid). A name that is not a
        model field is a ConfigOverrideError naming it and the nearest valid names."""
        check_override_names(overrides, where)
        overrides = dict(overrides)
        query_num = overrides.pop("image_token_len", None)
        for key, value in overrides.items():
            setattr(self, key, value)
        if query_num is not None:
            self.set_query_num(query_num)
        self._check_geometry()

    @property
    def tower_grid(self) -> int:
        """Side of the square token grid both towers are resized to (24)."""
        return int(round(self.mm_vision_tower_aux_token_len_list[0] ** 0.5))

    @property
    def query_side(self) -> int:
        """Side of the SVA query grid (12 for 144 queries, 24 for 576)."""
        return int(round(self.query_num_list[0] ** 0.5))

    @property
    def cell_side(self) -> int:
        """Tower tokens per query cell along one axis (2 for 144 queries, 1 for 576)."""
        return self.tower_grid // self.query_side

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        """As HF's, with an original `cambrian_qwen` dict mapped to our fields before any type check."""
        config_dict, rest = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == ORIGINAL_MODEL_TYPE:
            config_dict = original_to_longvu_dict(config_dict)
        return config_dict, rest

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        if config_dict.get("model_type") == ORIGINAL_MODEL_TYPE:
            config_dict = original_to_longvu_dict(config_dict)
        return super().from_dict(config_dict, **kwargs)


class ConfigOverrideError(ValueError):
    """A config override that names no LongVU model field."""


def override_fields() -> frozenset[str]:
    """The fields a caller may override: Qwen2's and LongVU's, not HF's config plumbing (dtype, ...)."""
    base = {f.name for f in dataclasses.fields(PretrainedConfig)}
    return frozenset(f.name for f in dataclasses.fields(LongVUConfig) if f.name not in base)


def check_override_names(overrides: dict[str, Any], where: str = "config overrides") -> None:
    """Raise ConfigOverrideError for the first name that is no overridable field, with the nearest names."""
    fields = override_fields()
    for key in overrides:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(near)}?" if near else f"valid fields: {', '.join(sorted(fields))}"
            raise ConfigOverrideError(f"{where}: {key!r} is not a LongVU model field; {hint}")


def original_to_longvu_dict(original: dict[str, Any]) -> dict[str, Any]:
    """Map an original `cambrian_qwen` config.json dict to LongVUConfig fields (compat switches on)."""
    out = {k: v for k, v in original.items() if k not in _ORIGINAL_ONLY_FIELDS}
    out["model_type"] = LongVUConfig.model_type
    out.pop("rope_scaling", None)  # the original forces it to None
    out.update(COMPAT_SWITCHES)
    out["compat_dino_legacy_pos_interp"] = True
    out.setdefault("tokenizer_model_max_length", 8192)
    if out.get("vocab_size", 0) > QWEN_TOKENIZER_LEN:
        out["generation_vocab_size"] = QWEN_TOKENIZER_LEN
    return out


AutoConfig.register(LongVUConfig.model_type, LongVUConfig)
