"""Model FLOPs per training step (vision towers, connector, LLM) and model FLOPs utilisation.

Counts follow the usual convention: 2 FLOPs per multiply-add, forward = 2 * params * tokens, backward
twice the forward for trained weights (activation gradients only for frozen ones), recomputation from
gradient checkpointing not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longvu.fp8 import Fp8Linear

# Dense bf16 peak FLOP/s per device, by substring of the device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device we know; None elsewhere (no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def _params(module) -> int:
    """Weights of `module`, counted as its parameters were before any became quantized buffers (the
    NF4 `weight` buffers of longvu.quantize, the FP8 weights and biases of longvu.fp8.Fp8Linear)."""
    if module is None:
        return 0
    count = 0
    for part in module.modules():
        count += sum(p.numel() for p in part.parameters(recurse=False))
        if isinstance(part, Fp8Linear):
            count += part.weight_fp8.numel() + (0 if part.bias is None else part.bias.numel())
        elif (weight := dict(part.named_buffers(recurse=False)).get("weight")) is not None:
            count += weight.numel()
    return count


@dataclass
class FlopModel:
    """Parameter counts and shapes the FLOP estimate needs, read once from the model."""

    llm_params: int  # decoder layers (no embeddings; lm_head counted separately)
    lm_head_params: int
    layers: int
    hidden: int
    siglip_params: int
    dino_params: int
    siglip_tokens: int  # patch tokens per frame
    dino_tokens: int
    aux_params: int  # the two aux projectors, run on every tower token
    sampler_params: int  # SVA, run once per query
    projector_params: int  # run on the high- and low-res grids
    tower_tokens: int  # tokens per frame after the resize (576)
    queries: int
    lowres_queries: int
    lora: bool

    @classmethod
    def from_model(cls, longvu, lora: bool) -> "FlopModel":
        cfg = longvu.config
        inner = longvu.model
        siglip, dino = inner.towers
        s_cfg, d_cfg = siglip.vision_tower.config, dino.vision_tower.config
        return cls(
            llm_params=_params(inner.layers), lm_head_params=_params(longvu.lm_head),
            layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
            siglip_params=_params(siglip), dino_params=_params(dino),
            siglip_tokens=(cfg.siglip_image_size // s_cfg.patch_size) ** 2,
            dino_tokens=(cfg.dino_image_size // d_cfg.patch_size) ** 2 + 1,
            aux_params=_params(inner.mm_projector_aux_0) + _params(inner.mm_projector_aux_1),
            sampler_params=_params(inner.vision_sampler_0), projector_params=_params(inner.mm_projector),
            tower_tokens=cfg.tower_grid ** 2, queries=cfg.image_token_len, lowres_queries=cfg.lowres_token ** 2,
            lora=lora,
        )

    def step_flops(self, sequences: list[int], scored_tokens: int, frames_in: int, frames_kept: int) -> float:
        """FLOPs of one forward+backward over sequences of the given lengths."""
        tokens = sum(sequences)
        train_factor = 4 if self.lora else 6  # frozen base weights: no weight gradients
        llm = train_factor * self.llm_params * tokens
        llm += 6 * self.layers * self.hidden * sum(s * s for s in sequences)  # causal attention, fwd+bwd
        llm += 6 * self.lm_head_params * scored_tokens
        towers = 2 * self.dino_params * self.dino_tokens * frames_in + 2 * self.siglip_params * self.siglip_tokens * frames_kept
        connector = 6 * frames_kept * (self.aux_params * self.tower_tokens + self.sampler_params * self.queries
                                       + self.projector_params * (self.queries + self.lowres_queries))
        return float(llm + towers + connector)
