"""The two frozen vision towers: SigLIP (last layer before post-layernorm) and DINOv2 (after the final
layernorm, patch tokens only), each resized to a square token grid (24x24 for the released shapes).

Module layout `vision_tower.<HF model keys>` matches the original's tower attribute, so weights written
as `model.vision_tower_aux_list.{0,1}.vision_tower.*` load directly.
"""

from __future__ import annotations

import logging
import math
import types
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel
from transformers.core_model_loading import revert_weight_conversion

from longvu.checkpoint import TOWER_KINDS, tower_folder_layout, write_tower_folder
from longvu.fp8 import fp8_linears
from longvu.token_grid import resize_token_grid

logger = logging.getLogger(__name__)


def _legacy_dino_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """DINOv2 position-embedding interpolation as in transformers 4.42 (the released checkpoints' formula):
    bicubic with scale_factor (h + 0.1) / sqrt(N) instead of a target size. Frozen embeddings are
    interpolated once per pixel size and reused (eager: one bicubic kernel of ~10 ms on an H200 per call)."""
    num_patches = embeddings.shape[1] - 1
    pos = self.position_embeddings
    num_positions = pos.shape[1] - 1
    if num_patches == num_positions and height == width:
        return pos
    cacheable = not pos.requires_grad and not torch.compiler.is_compiling()
    key = (height, width, id(pos), pos.data_ptr(), pos._version, pos.device, pos.dtype) if cacheable else None
    cached = getattr(self, "_frozen_pos", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    class_pos = self.position_embeddings[:, :1]
    patch_pos = self.position_embeddings[:, 1:]
    dim = embeddings.shape[-1]
    patch = self.config.patch_size
    h0, w0 = height // patch + 0.1, width // patch + 0.1
    side = math.sqrt(num_positions)
    patch_pos = patch_pos.reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    target_dtype = patch_pos.dtype
    patch_pos = F.interpolate(
        patch_pos.to(torch.float32),
        scale_factor=(float(h0 / side), float(w0 / side)),
        mode="bicubic",
        align_corners=False,
    ).to(target_dtype)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
    out = torch.cat((class_pos, patch_pos), dim=1)
    if cacheable:
        self._frozen_pos = (key, out)
    return out


class FrozenTower(nn.Module):
    """Base: a frozen HF vision model under `self.vision_tower`, always in eval mode, run under no_grad,
    `chunk_size` frames at a time (optionally under torch.compile, see `compile`)."""

    vision_tower: nn.Module
    chunk_size = 64
    profile_label = "tower"  # its region in profiles: longvu/<label>

    def __init__(self, grid_side: int):
        super().__init__()
        self.grid_side = grid_side
        self._compiled = None

    def train(self, mode: bool = True):  # frozen towers never leave eval mode
        return super().train(False)

    @property
    def hidden_size(self) -> int:
        return self.vision_tower.config.hidden_size

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compile(self, **options) -> None:
        """Run the tower under `torch.compile(**options)`. Every chunk is then padded to `chunk_size`
        frames (outputs of the padding dropped), so one static-shape graph serves every call."""
        self._compiled = torch.compile(self._features, dynamic=False, **options)

    def quantize_fp8(self, per_row: bool = True) -> int:
        """Run the encoder's linear layers in FP8 (`longvu.fp8.Fp8Linear`: e4m3, per-row weight and
        per-token activation scales, or one scale each with `per_row=False`) -> the number of layers
        converted; FP8 speed needs a GPU with FP8 matrix units (Ada, Hopper). Frame selection may then
        differ from bf16: benchmarks report the agreement."""
        count = fp8_linears(self.vision_tower.encoder, per_row)
        logger.info("%s: %d linear layers in FP8", type(self).__name__, count)
        return count

    def _chunk(self, pixels: torch.Tensor) -> torch.Tensor:
        """One chunk [n <= chunk_size, 3, S, S] -> [n, grid_side**2, hidden]."""
        if self._compiled is None:
            return resize_token_grid(self._features(pixels), self.grid_side)
        n = pixels.shape[0]
        if n < self.chunk_size:
            pixels = torch.cat([pixels, pixels.new_zeros(self.chunk_size - n, *pixels.shape[1:])])
        return resize_token_grid(self._compiled(pixels)[:n], self.grid_side)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor | Iterable[torch.Tensor], chunk_size: int | None = None) -> torch.Tensor:
        """pixels [N, 3, S, S], or an iterable of such chunks (e.g. preprocessed on the fly) ->
        features [N, grid_side**2, hidden], computed `chunk_size` (default `self.chunk_size`) frames at a time."""
        dtype = next(self.vision_tower.parameters()).dtype
        size = min(chunk_size or self.chunk_size, self.chunk_size) if self._compiled else chunk_size or self.chunk_size
        chunks = [pixels] if isinstance(pixels, torch.Tensor) else pixels
        with record_function(f"longvu/{self.profile_label}"):
            outs = [self._chunk(part.to(dtype)) for chunk in chunks for part in chunk.split(size)]
            return torch.cat(outs) if len(outs) > 1 else outs[0]


class SiglipTower(FrozenTower):
    """SigLIP: output of the last encoder layer, before `post_layernorm` (the pooling head is skipped)."""

    profile_label = "siglip"

    def __init__(self, config: SiglipVisionConfig, grid_side: int = 24):
        super().__init__(grid_side)
        self.vision_tower = SiglipVisionModel(config)
        self.vision_tower.requires_grad_(False)

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        tower = self.vision_tower
        return tower.encoder(inputs_embeds=tower.embeddings(pixels)).last_hidden_state


class DinoTower(FrozenTower):
    """DINOv2: `last_hidden_state` (after the final layernorm) without the CLS token."""

    profile_label = "dino"

    def __init__(self, config: Dinov2Config, grid_side: int = 24, legacy_pos_interp: bool = True):
        super().__init__(grid_side)
        self.vision_tower = Dinov2Model(config)
        self.vision_tower.requires_grad_(False)
        if legacy_pos_interp:
            emb = self.vision_tower.embeddings
            emb.interpolate_pos_encoding = types.MethodType(_legacy_dino_pos_encoding, emb)

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]


def speed_up_towers(towers: Iterable[FrozenTower], fp8: bool, compile: bool) -> None:
    """Each tower's encoder linear layers in FP8 (`quantize_fp8`) and/or the tower under torch.compile;
    FP8 towers are always compiled (uncompiled, their per-token quantization makes them slower than bf16)."""
    for tower in towers:
        if fp8:
            tower.quantize_fp8()
        if compile or fp8:
            tower.compile()


def build_towers(config) -> nn.ModuleList:
    """[SiglipTower, DinoTower] from `config.siglip_config` / `config.dino_config` (dicts)."""
    if config.siglip_config is None or config.dino_config is None:
        raise ValueError(
            "the config has no tower configs: give siglip_path/dino_path (folders with each tower's "
            "config.json and weights) when loading an original LongVU checkpoint"
        )
    siglip_cfg = SiglipVisionConfig(**{k: v for k, v in config.siglip_config.items() if k != "model_type"})
    dino_cfg = Dinov2Config(**{k: v for k, v in config.dino_config.items() if k != "model_type"})
    return nn.ModuleList([
        SiglipTower(siglip_cfg, config.tower_grid),
        DinoTower(dino_cfg, config.tower_grid, config.compat_dino_legacy_pos_interp),
    ])


def save_tower_folders(towers: nn.ModuleList, out_dir, pixel_sizes: tuple[int, int]) -> tuple[Path, Path]:
    """Write [SiglipTower, DinoTower] as tower folders `out_dir/siglip`, `out_dir/dino` in the hub layout
    (`longvu.checkpoint.write_tower_folder`; `pixel_sizes` = their (SigLIP, DINOv2) input sizes) -> paths."""
    paths = []
    for tower, kind, pixels in zip(towers, TOWER_KINDS, pixel_sizes):
        model = tower.vision_tower
        state = revert_weight_conversion(model, model.state_dict())  # 5.x in-memory names -> checkpoint names
        paths.append(write_tower_folder(Path(out_dir) / kind, kind, model.config.to_dict(), state, pixels))
    return paths[0], paths[1]


def load_tower_weights(towers: nn.ModuleList, siglip_path, dino_path) -> None:
    """Load [SiglipTower, DinoTower] from their tower folders, hub layout or the older LongVU one (an
    unknown layout is a ValueError naming the folder). Strict: every tensor we use must load; SigLIP's
    pooling head and post-layernorm, which LongVU skips, may be absent."""
    for tower, kind, model_cls, path in zip(towers, TOWER_KINDS, (SiglipVisionModel, Dinov2Model), (siglip_path, dino_path)):
        if path is None:
            raise ValueError("tower weights are not in the checkpoint: give siglip_path and dino_path")
        tower_folder_layout(path, kind)
        loaded, info = model_cls.from_pretrained(path, output_loading_info=True)
        used_missing = [k for k in info["missing_keys"] if not k.startswith(("head.", "post_layernorm."))]
        if used_missing:
            raise ValueError(f"{path}: tower weights missing {sorted(used_missing)[:5]}...")
        result = tower.vision_tower.load_state_dict(loaded.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{path}: tower does not match the config: {result}")
    logger.info("loaded towers from %s and %s", siglip_path, dino_path)
