#!/usr/bin/env python
"""Time to first token of `LongVUForCausalLM.generate` for long 1-fps videos, at the released shapes.

    python scripts/bench/generate_ttft.py [--minutes 10 60] [--scenes-per-minute 2] [--dtype bf16]
    python scripts/bench/generate_ttft.py --tiny        # the same code path on the tiny model, on the CPU

Random weights: SigLIP-so400m-384, DINOv2-giant, SVA/projector and the full 28-layer Qwen2-7B LLM
(`scripts/bench/vision_pipeline.released_shape_config(28)`). Each video is `minutes * 60` frames of
synthetic scenes generated as normalised tensors on the device (no decoding). The prompt is a Qwen
chat prompt of realistic length (system + question, ~60 tokens) with one video placeholder.

Per video it reports: the vision pipeline alone (towers + SVA + projector + regime/STC, i.e.
`prepare_multimodal_inputs`), the time to first token (`generate(max_new_tokens=1)`: vision + LLM
prefill + one sampling step), and the time to first token of a second question on the same video with
the media cache (`longvu.media_cache.MediaCache`, as `longvu generate --interactive` does), plus
frames kept, visual tokens, the sequence length and peak GPU memory. One table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from longvu.constants import IMAGE_TOKEN_INDEX, QWEN_ASSISTANT_HEADER_IDS  # noqa: E402
from longvu.media_cache import MediaCache  # noqa: E402
from longvu.modeling import LongVUForCausalLM  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IM_START, IM_END, NEWLINE = 151644, 151645, 198


def prompt_ids(question_tokens: int, seed: int) -> list[int]:
    """A chat-shaped prompt: <|im_start|>system ... <|im_end|>\\n<|im_start|>user <video> \\n question
    <|im_end|>\\n<|im_start|>assistant\\n, with random ordinary tokens for the words."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(1000, 100000, (n,), generator=g).tolist()  # noqa: E731
    return ([IM_START, *words(12), IM_END, NEWLINE, IM_START, *words(1), NEWLINE, IMAGE_TOKEN_INDEX, NEWLINE,
             *words(question_tokens), IM_END, NEWLINE] + list(QWEN_ASSISTANT_HEADER_IDS))


def synthetic_video(frames: int, scenes: int, config, device, dtype) -> dict:
    """generate() media kwargs for a [frames]-long 1-fps clip of `scenes` scenes (16:9 frames)."""
    from vision_pipeline import scene_clip

    siglip = scene_clip(frames, scenes, config.siglip_image_size, device, dtype, seed=0)
    dino = scene_clip(frames, scenes, config.dino_image_size, device, dtype, seed=0)
    return dict(pixel_values_siglip=[siglip], pixel_values_dino=[dino], media_sizes=[(360, 640)],
                media_kinds=["video"])


def build_model(tiny: bool, device, dtype) -> LongVUForCausalLM:
    if tiny:
        from longvu.tiny import tiny_model

        return tiny_model("video", dtype=dtype, compat_swap_video_hw=True, compat_dot_product_scoring=True).to(device)
    from vision_pipeline import released_shape_config

    with torch.device(device):
        model = LongVUForCausalLM(released_shape_config(28))
    return model.to(dtype).eval()


class Clock:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start


@torch.no_grad()
def measure(model, minutes: float, scenes_per_minute: float, device, dtype, question_tokens: int) -> dict:
    frames = int(round(minutes * 60))
    media = synthetic_video(frames, max(1, int(minutes * scenes_per_minute)), model.config, device, dtype)
    ids = torch.tensor([prompt_ids(question_tokens, seed=0)], device=device)
    ids2 = torch.tensor([prompt_ids(question_tokens, seed=1)], device=device)
    clock = Clock(device)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    prepared, vision_s = clock(lambda: model.prepare_multimodal_inputs(ids, None, None, **media, padding_side="left"))
    stats = prepared.stats
    _, ttft_s = clock(lambda: model.generate(ids, **media, max_new_tokens=1, do_sample=False))
    cache = MediaCache()
    model.generate(ids, **media, media_encoder=cache, max_new_tokens=1, do_sample=False)  # fills the cache
    _, cached_s = clock(lambda: model.generate(ids2, **media, media_encoder=cache, max_new_tokens=1, do_sample=False))
    return {
        "video": f"{minutes:g} min", "frames": frames, "kept": sum(stats.frames_kept),
        "visual_tokens": sum(stats.visual_tokens), "seq_len": stats.sequence_lengths[0],
        "regime": prepared.media[0].regime, "vision_s": vision_s, "ttft_s": ttft_s, "ttft_cached_s": cached_s,
        "cache_encodes": cache.encodes,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if clock.cuda else float("nan"),
    }


def print_table(rows: list[dict], title: str) -> None:
    print(title)
    cols = [("video", 8, "{}"), ("frames", 7, "{}"), ("kept", 5, "{}"), ("visual_tokens", 13, "{}"),
            ("seq_len", 7, "{}"), ("regime", 10, "{}"), ("vision_s", 9, "{:.2f}"), ("ttft_s", 8, "{:.2f}"),
            ("ttft_cached_s", 13, "{:.2f}"), ("peak_gib", 8, "{:.1f}")]
    print("| " + " | ".join(f"{c:>{w}}" for c, w, _ in cols) + " |")
    print("|" + "|".join("-" * (w + 2) for _, w, _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(f"{f.format(r[c]):>{w}}" for c, w, f in cols) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 60], help="video lengths at 1 fps")
    parser.add_argument("--scenes-per-minute", type=float, default=2.0)
    parser.add_argument("--question-tokens", type=int, default=40)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 --tiny")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (checks the code path)")
    parser.add_argument("--warmup", action="store_true", help="one untimed short run first (kernels, allocator)")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    dtype = DTYPES[args.dtype or ("fp32" if args.tiny else "bf16")]
    model = build_model(args.tiny, device, dtype)
    if args.warmup:
        measure(model, 0.5, args.scenes_per_minute, device, dtype, args.question_tokens)
    rows = [measure(model, m, args.scenes_per_minute, device, dtype, args.question_tokens) for m in args.minutes]
    where = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "CPU"
    print_table(rows, f"LongVU time to first token ({'tiny' if args.tiny else 'released shapes, 28-layer LLM'}, "
                      f"random weights, {str(dtype).removeprefix('torch.')}, {where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
