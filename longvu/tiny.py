"""Tiny LongVU models of every shape family, for tests and the quickstart (nothing downloaded).

The tiny towers keep the real token geometry (27x27 patches resized to 24x24; DINOv2's 37x37
position grid interpolated to 27x27), so every compression branch behaves as at full size.
"""

from __future__ import annotations

import torch

from longvu.config import LongVUConfig
from longvu.constants import TINY_FAMILIES

TINY_SIGLIP = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   patch_size=2, image_size=55, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
TINY_DINO = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, patch_size=2,
                 image_size=74, use_swiglu_ffn=True, layerscale_value=1.0, layer_norm_eps=1e-6)
TINY_SIGLIP_PIXELS, TINY_DINO_PIXELS = 55, 54

FAMILIES = TINY_FAMILIES  # name -> the connector/compression fields that define it


def tiny_config(family: str = "video", vocab_size: int = 151936, **overrides) -> LongVUConfig:
    """A LongVUConfig with a 2-layer, 64-wide Qwen2 and tiny towers; `family` from FAMILIES."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {sorted(FAMILIES)}")
    fields = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
        siglip_config=dict(TINY_SIGLIP), dino_config=dict(TINY_DINO),
        siglip_image_size=TINY_SIGLIP_PIXELS, dino_image_size=TINY_DINO_PIXELS,
        vision_hidden_size=32, connector_depth=3, lowres_token=8, tokenizer_model_max_length=1024,
        dino_threshold=0.83, drop_threshold=0.8,
    )
    fields.update(FAMILIES[family])
    fields.update(overrides)
    return LongVUConfig(**fields)


def tiny_model(family: str = "video", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised tiny LongVUForCausalLM (deterministic for a seed), in eval mode."""
    from longvu.modeling import LongVUForCausalLM

    torch.manual_seed(seed)
    model = LongVUForCausalLM(tiny_config(family, **overrides)).to(dtype)
    return model.eval()


def save_tiny_towers(out_dir, seed: int = 0) -> tuple[str, str]:
    """Write the towers of `tiny_model(seed=seed)` as tower folders out_dir/siglip, out_dir/dino (the hub
    layout, `longvu.towers.save_tower_folders`) -> their paths.

    Checkpoints never hold the frozen towers, so tiny runs that chain stages load them from here."""
    from longvu.towers import save_tower_folders

    model = tiny_model("video", seed=seed)
    siglip, dino = save_tower_folders(model.model.towers, out_dir, (TINY_SIGLIP_PIXELS, TINY_DINO_PIXELS))
    return str(siglip), str(dino)
