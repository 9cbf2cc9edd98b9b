#!/usr/bin/env python
"""Vision-pipeline timings and shapes at the released LongVU shapes (random weights).

    python scripts/bench/vision_pipeline.py [--frames 3600] [--scenes 120] [--dtype bf16]

Builds SigLIP-so400m-384 and DINOv2-giant towers, the SVA connector (1024 wide) and the projector
(3584 wide), generates a clip of `--frames` 1-fps frames made of `--scenes` scenes (each scene one
random smooth image plus per-frame noise), and times each stage on one GPU: DINO on all frames
(streamed, with window selection), SigLIP on the kept frames, SVA + projector, and the regime/
compression step. Prints one table with shapes, seconds and peak memory.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from longvu.config import LongVUConfig
from longvu.modeling import LongVUModel
from longvu.visual import MediaItem, VisionFeatures, _project, _read_size, _stream_dino, _sva, item_tokens
from longvu.layout import content_mask

SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     patch_size=14, image_size=384, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
DINOV2_GIANT = dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, patch_size=14,
                    image_size=518, use_swiglu_ffn=True, layerscale_value=1.0, layer_norm_eps=1e-6)


def released_shape_config(llm_layers: int) -> LongVUConfig:
    """The released video checkpoint's shapes; the LLM keeps its width but only `llm_layers` layers
    (the vision pipeline uses its embeddings only)."""
    return LongVUConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=llm_layers,
        num_attention_heads=28, num_key_value_heads=4, siglip_config=SIGLIP_SO400M, dino_config=DINOV2_GIANT,
        vision_hidden_size=1024, image_token_len=144, highres=True, lowres_token=8,
        tokenizer_model_max_length=8192, drop_threshold=0.8, dino_threshold=0.83,
        compat_swap_video_hw=True, compat_dot_product_scoring=True, compat_lowres_single_image=True,
    )


def scene_clip(frames: int, scenes: int, size: int, device, dtype, seed: int = 0) -> torch.Tensor:
    """[frames, 3, size, size] normalised pixels: `scenes` smooth random images, each held for
    frames/scenes frames with N(0, 0.03) noise."""
    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(scenes, 3, size // 16, size // 16, generator=g, device=device)
    base = F.interpolate(base, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
    clip = base.repeat_interleave(-(-frames // scenes), dim=0)[:frames].to(dtype)
    return clip.add_(0.03 * torch.randn(clip.shape, generator=g, device=device, dtype=dtype))


class Timer:
    def __init__(self):
        self.rows = []

    def __call__(self, name, fn, shape_of=lambda out: tuple(out.shape)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.rows.append((name, shape_of(out), seconds, torch.cuda.max_memory_allocated() / 2**30))
        return out

    def print(self, title):
        print(title)
        print(f"| {'stage':<28} | {'output shape':<34} | {'seconds':>8} | {'peak GiB':>8} |")
        print(f"|{'-' * 30}|{'-' * 36}|{'-' * 10}|{'-' * 10}|")
        for name, shape, sec, mem in self.rows:
            print(f"| {name:<28} | {str(shape):<34} | {sec:>8.2f} | {mem:>8.1f} |")
        print(f"| {'total':<28} | {'':<34} | {sum(r[2] for r in self.rows):>8.2f} | {'':>8} |")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=3600)
    parser.add_argument("--scenes", type=int, default=120)
    parser.add_argument("--prompt-tokens", type=int, default=60)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    args = parser.parse_args()
    device = torch.device("cuda")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16

    config = released_shape_config(llm_layers=1)
    with torch.device(device):
        model = LongVUModel(config).to(dtype).eval()
    siglip_px = scene_clip(args.frames, args.scenes, 384, device, dtype)
    dino_px = F.interpolate(siglip_px, size=(378, 378), mode="bilinear", align_corners=False)
    budget = config.tokenizer_model_max_length - config.inference_max_length - args.prompt_tokens
    item = MediaItem(siglip_px, dino_px, args.height, args.width, True, budget, budget - 1)
    text = model.embed_tokens(torch.randint(0, 151000, (args.prompt_tokens - 14,), device=device))

    _stream_dino(model, MediaItem(siglip_px[:64], dino_px[:64], args.height, args.width, True, budget, budget))  # warm-up
    timer = Timer()
    dino_feats, kept = timer("DINOv2-g + selection", lambda: _stream_dino(model, item), lambda o: tuple(o[0].shape))
    siglip_feats = timer("SigLIP on kept frames", lambda: model.vision_tower_aux_list[0](siglip_px[kept]))
    masks = content_mask(config.tower_grid, *_read_size(item, config.compat_swap_video_hw)).to(device)
    masks = masks.expand(kept.numel(), -1, -1)
    queries = timer("aux proj + SVA (3 layers)", lambda: _sva(model, siglip_feats, dino_feats, masks))
    hi, lo = timer("projector (hi + lo grids)", lambda: _project(model, queries), lambda o: tuple(o[0].shape))
    result = timer("regime + layout + STC", lambda: item_tokens(model, item, VisionFeatures(kept, hi, lo), text),
                   lambda o: (tuple(o.tokens.shape), o.regime))
    timer.print(
        f"{args.frames} frames ({args.scenes} scenes), frame size {args.height}x{args.width}, {args.dtype}, "
        f"{torch.cuda.get_device_name()}: kept {kept.numel()} frames, {result.tokens.shape[0]} visual tokens"
    )


if __name__ == "__main__":
    main()
