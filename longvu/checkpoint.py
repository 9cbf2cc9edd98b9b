"""Checkpoint file I/O: tensor names and shapes, configs, tower folders, the original LongVU layout.

Pure file work: this module reads and writes tensors and configs and maps key names; it imports no
model class (`LongVUForCausalLM.from_pretrained` is the one loader, built on `resolve_config`).

An original directory holds `config.json` (`model_type: cambrian_qwen`) and `pytorch_model.bin` or
`model.safetensors` (sharded or not), with the language model and connector but no towers; the
towers come from their own HF folders. 144 vs 576 queries is inferred from the presence of
`pos_embed_0` in the weights, not trusted from the config.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Dinov2Config, SiglipVisionConfig

from longvu.config import ORIGINAL_MODEL_TYPE, LongVUConfig
from longvu.constants import DINO_MEAN, DINO_STD, SIGLIP_MEAN, SIGLIP_STD

logger = logging.getLogger(__name__)

TOWER_PREFIX = "model.vision_tower_aux_list."
POS_EMBED_KEY = "model.vision_sampler_0.layers.0.pos_embed_0"
_TOWER_CONFIGS = {"siglip": SiglipVisionConfig, "dino": Dinov2Config}


def is_original_checkpoint(path: str | os.PathLike) -> bool:
    """True if `path/config.json` is an original LongVU (`cambrian_qwen`) config."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == ORIGINAL_MODEL_TYPE


def checkpoint_tensor_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """Names and shapes of the tensors in a checkpoint directory, without loading their data.

    Accepts model.safetensors, sharded safetensors (index json), pytorch_model.bin and sharded bins."""
    path = Path(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            shards = sorted(set(json.loads((path / index_name).read_text())["weight_map"].values()))
            shapes: dict[str, list[int]] = {}
            for shard in shards:
                shapes.update(_file_shapes(path / shard))
            return shapes
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return _file_shapes(path / name)
    raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or shard index found")


def _file_shapes(file: Path) -> dict[str, list[int]]:
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    # legacy (non-zip) files load weights-only too, without mmap
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    return {k: list(v.shape) for k, v in state.items()}


def infer_query_num(shapes: dict[str, list[int]], tower_tokens: int = 576) -> int:
    """SVA query count from the weights: `pos_embed_0` [r*r, C] present -> tower_tokens / (r*r), else tower_tokens."""
    if POS_EMBED_KEY in shapes:
        return tower_tokens // shapes[POS_EMBED_KEY][0]
    return tower_tokens


def tower_config_dicts(siglip_path: str | os.PathLike, dino_path: str | os.PathLike) -> tuple[dict, dict]:
    """Vision configs (as dicts) read from the two tower folders; a full SigLIP config gives its vision part."""
    return (
        SiglipVisionConfig.from_pretrained(siglip_path).to_dict(),
        Dinov2Config.from_pretrained(dino_path).to_dict(),
    )


# ---- tower folders -----------------------------------------------------------------------------
# A tower folder is what the hub holds for the tower class, so transformers 4.42 (the original LongVU's
# pin) and 5.x both load it: config.json, model.safetensors, preprocessor_config.json. SigLIP weights
# are keyed `vision_model.*` (4.42's SiglipVisionModel nests its modules there; 5.x strips the prefix
# on load), DINOv2 weights in Dinov2Model's checkpoint names (`attention.attention.query`,
# `mlp.weights_in`, ...). Folders LongVU wrote before had SigLIP keys without the prefix; they still load.

TOWER_KINDS = ("siglip", "dino")
_TOWER_NAMES = {"siglip": "SigLIP", "dino": "DINOv2"}
_HUB_PREFIX = {"siglip": "vision_model.", "dino": ""}
# One tensor name tells a layout: (hub, older LongVU folders or None). For DINOv2 it is one that 5.x
# renames in memory (`attention.q_proj`), so a state dict not converted back is caught too.
_LAYOUT_KEYS = {
    "siglip": ("vision_model.embeddings.patch_embedding.weight", "embeddings.patch_embedding.weight"),
    "dino": ("encoder.layer.0.attention.attention.query.weight", None),
}


def tower_key_layout(keys, kind: str, where: str) -> str:
    """"hub" or "legacy" (SigLIP keys without `vision_model.`, as LongVU wrote before) for the tensor
    names of a `kind` tower; anything else is a ValueError naming `where` and the expected names."""
    keys = set(keys)
    hub, legacy = _LAYOUT_KEYS[kind]
    if hub in keys:
        return "hub"
    if legacy is not None and legacy in keys:
        return "legacy"
    expected = f"{hub!r}" + (f" (or {legacy!r}, older LongVU folders)" if legacy else "")
    raise ValueError(f"{where}: not a {_TOWER_NAMES[kind]} tower: no tensor {expected}; "
                     f"found e.g. {sorted(keys)[:3]}")


def tower_folder_layout(folder: str | os.PathLike, kind: str) -> str:
    """`tower_key_layout` of the weights in a tower folder (a missing folder or weights: ValueError)."""
    try:
        keys = checkpoint_tensor_shapes(folder)
    except FileNotFoundError as err:
        raise ValueError(f"{folder}: not a {_TOWER_NAMES[kind]} tower folder: {err}") from err
    return tower_key_layout(keys, kind, str(folder))


def preprocessor_config(kind: str, pixels: int) -> dict:
    """preprocessor_config.json of a tower folder: the hub's image processor class for the tower, at
    the input size LongVU feeds it (`pixels` square), with LongVU's per-tower mean/std."""
    common = {"do_normalize": True, "do_rescale": True, "do_resize": True, "resample": 3,
              "rescale_factor": 1 / 255}
    if kind == "siglip":
        return {**common, "image_processor_type": "SiglipImageProcessor", "image_mean": list(SIGLIP_MEAN),
                "image_std": list(SIGLIP_STD), "size": {"height": pixels, "width": pixels}}
    return {**common, "image_processor_type": "BitImageProcessor", "image_mean": list(DINO_MEAN),
            "image_std": list(DINO_STD), "do_center_crop": True, "do_convert_rgb": True,
            "crop_size": {"height": pixels, "width": pixels}, "size": {"shortest_edge": pixels}}


def write_tower_folder(folder: str | os.PathLike, kind: str, config: dict, state: dict, pixels: int,
                       where: str = "tower weights") -> Path:
    """Write a `kind` tower folder (the hub layout above) from its vision config (dict) and `state` in
    checkpoint names (SigLIP keys with or without `vision_model.`) -> the folder."""
    if tower_key_layout(state, kind, where) == "legacy":
        state = {_HUB_PREFIX[kind] + k: v for k, v in state.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _TOWER_CONFIGS[kind](**{k: v for k, v in config.items() if k != "model_type"}).save_pretrained(folder)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(kind, pixels), indent=2) + "\n")
    return folder


def split_tower_file(weights_file: str | os.PathLike, configs: tuple[dict, dict], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write a single tower file keyed `model.vision_tower_aux_list.{0,1}.vision_tower.*` in hub names (as
    the oracle stores them) into two tower folders `out_dir/siglip`, `out_dir/dino` -> their paths."""
    state = load_file(str(weights_file))
    pixels = tower_pixel_sizes(*configs)
    out = []
    for i, (kind, cfg, size) in enumerate(zip(TOWER_KINDS, configs, pixels)):
        prefix = f"{TOWER_PREFIX}{i}.vision_tower."
        tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not tensors:
            raise ValueError(f"{weights_file}: no tensors under {prefix}")
        out.append(write_tower_folder(Path(out_dir) / kind, kind, cfg, tensors, size, where=str(weights_file)))
    return out[0], out[1]


def tower_pixel_sizes(siglip_config: dict, dino_config: dict) -> tuple[int, int]:
    """Input pixels of (SigLIP, DINOv2): SigLIP at its configured image size; DINOv2 at the same patch
    grid as SigLIP (27 patches: 384 / 14 -> 27 * 14 = 378 at full size; 55 / 2 -> 54 for the tiny towers)."""
    grid = siglip_config["image_size"] // siglip_config["patch_size"]
    return siglip_config["image_size"], grid * dino_config["patch_size"]


def tower_path_beside(model_dir: str | os.PathLike, tower_path: str | None) -> str | None:
    """A tower folder named in a config.json: a relative path names a folder inside `model_dir` when one
    exists there (self-contained exports: `siglip`, `dino`), else it stays relative to the working directory."""
    if tower_path is None or Path(tower_path).is_absolute():
        return tower_path
    inside = Path(model_dir) / tower_path
    return str(inside) if inside.is_dir() else tower_path


@dataclass
class ResolvedConfig:
    """What loading a directory needs besides its weights: the config (overrides applied), the tower
    folders to load from (None when the weights should hold the towers), and the query count the
    weights were trained with (`weights_query_num` != config.image_token_len: new pos_embed_*)."""

    config: LongVUConfig
    siglip_path: str | None
    dino_path: str | None
    weights_query_num: int


def resolve_config(path: str | os.PathLike, siglip_path=None, dino_path=None, overrides: dict | None = None) -> ResolvedConfig:
    """The config of a LongVU directory, original layout (compat switches on) or ours.

    Tower configs come from the config.json, else from the tower folders (given, else named in the
    config.json, relative to the directory); the original layout gets its pixel sizes from them. The
    query count follows the weights (`pos_embed_0` present -> 144); `overrides` apply after
    (`LongVUConfig.apply_overrides`, e.g. `image_token_len=144` for the video stage)."""
    config = LongVUConfig.from_pretrained(path)
    siglip_path = siglip_path or tower_path_beside(path, config.siglip_path)
    dino_path = dino_path or tower_path_beside(path, config.dino_path)
    if config.siglip_config is None or config.dino_config is None:
        if siglip_path is None or dino_path is None:
            raise ValueError(f"{path}: no vision towers in this checkpoint; give siglip_path and dino_path")
        config.siglip_config, config.dino_config = tower_config_dicts(siglip_path, dino_path)
    if siglip_path is not None and dino_path is not None:
        config.siglip_path, config.dino_path = str(siglip_path), str(dino_path)
    if is_original_checkpoint(path):  # the original config has no pixel sizes: they follow from the towers
        config.siglip_image_size, config.dino_image_size = tower_pixel_sizes(config.siglip_config, config.dino_config)
    weights_query_num = infer_query_num(checkpoint_tensor_shapes(path), config.mm_vision_tower_aux_token_len_list[0])
    config.set_query_num(weights_query_num)
    config.apply_overrides(overrides or {}, where=f"{path}: overrides")
    return ResolvedConfig(config, siglip_path and str(siglip_path), dino_path and str(dino_path), weights_query_num)


def temporary_tower_folders(weights_file, configs) -> tuple[tempfile.TemporaryDirectory, Path, Path]:
    """`split_tower_file` into a fresh temporary directory (kept alive by the returned handle)."""
    tmp = tempfile.TemporaryDirectory(prefix="longvu-towers-")
    siglip, dino = split_tower_file(weights_file, configs, tmp.name)
    return tmp, siglip, dino


# Original-layout fields with no LongVUConfig counterpart, written with the values the released configs use.
_ORIGINAL_FIXED_FIELDS = {
    "architectures": ["CambrianQwenForCausalLM"],
    "connect_layer": 2,
    "freeze_mm_mlp_adapter": False,
    "highres_connect": False,
    "image_aspect_ratio": "pad",
    "image_position": 91,
    "is_image_newline": True,
    "is_st_sampler": False,
    "mm_patch_merge_type": "flat",
    "mm_projector_lr": None,
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False,
    "mm_vision_sampler_lr": None,
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "mm_vision_tower_lr": None,
    "rope_scaling": None,
    "tune_mm_mlp_adapter": False,
    "unfreeze_mm_vision_tower": False,
    "use_mm_proj": True,
}
# LongVUConfig fields the original config does not have.
_LONGVU_ONLY_FIELDS = (
    "siglip_config", "dino_config", "siglip_path", "dino_path", "siglip_image_size", "dino_image_size",
    "compat_dino_legacy_pos_interp", "compat_swap_video_hw", "compat_lowres_single_image",
    "compat_dot_product_scoring", "generation_vocab_size", "dino_window", "max_selected_frames",
    "stc_chunk", "connector_heads", "rope_parameters", "layer_types", "pad_token_id", "dtype",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
)


def original_config_dict(config: LongVUConfig) -> dict:
    """Our config as an original `cambrian_qwen` config.json dict (spec §1.1 field names)."""
    out = {k: v for k, v in config.to_dict().items() if k not in _LONGVU_ONLY_FIELDS}
    out.update(_ORIGINAL_FIXED_FIELDS)
    out["model_type"] = ORIGINAL_MODEL_TYPE
    out["rope_theta"] = (config.rope_parameters or {}).get("rope_theta", 1e6)
    out["vision_tower_aux_token_len_list"] = list(config.mm_vision_tower_aux_token_len_list)
    out["num_of_vision_sampler_layers"] = 10
    out["torch_dtype"] = str(config.dtype).removeprefix("torch.") if config.dtype else "bfloat16"
    return dict(sorted(out.items()))


def save_original_layout(model, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` in the original LongVU layout: config.json (`cambrian_qwen`) and model.safetensors
    (sharded with an index above `max_shard_bytes`), without the towers, as the original stores it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(TOWER_PREFIX)}
    (out / "config.json").write_text(json.dumps(original_config_dict(model.config), indent=2) + "\n")
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
