"""`longvu quickstart`: the project's main job on an embedded default, with nothing to download.

Writes a synthetic clip, decodes it at 1 fps, builds a tiny random LongVU with the real Qwen2
tokenizer, and answers a question about the clip with `generate`, printing what the visual pipeline
did. (The tiny two-stage training run replaces this once the trainer lands.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("quickstart", help="tiny end-to-end run on a generated clip (no downloads)")
    parser.add_argument("--output", type=Path, default=Path("outputs/quickstart"), help="where the clip goes")
    parser.add_argument("--seconds", type=int, default=40, help="length of the generated clip")
    parser.add_argument("--question", default="What happens in this video?")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from data.synthetic import write_scene_video
    from data.video import SamplingConfig, decode_video
    from longvu.processing import build_prompt_ids, preprocess_frames
    from longvu.tiny import TINY_DINO_PIXELS, TINY_SIGLIP_PIXELS, tiny_model
    from longvu.tokenizer import build_qwen2_tokenizer

    start = time.perf_counter()
    args.output.mkdir(parents=True, exist_ok=True)
    clip = write_scene_video(args.output / "clip.mp4", seconds=args.seconds, n_scenes=4)
    decoded = decode_video(clip, SamplingConfig(video_fps=1.0))
    siglip, dino = preprocess_frames(decoded.frames, TINY_SIGLIP_PIXELS, TINY_DINO_PIXELS)

    tokenizer = build_qwen2_tokenizer()
    model = tiny_model("video")
    ids = torch.tensor([build_prompt_ids(tokenizer, args.question)])
    media = dict(pixel_values_siglip=[siglip], pixel_values_dino=[dino],
                 media_sizes=[tuple(decoded.size)], media_kinds=["video"])
    with torch.no_grad():
        visual = model.prepare_multimodal_inputs(ids, None, None, **media).media[0]
        new_tokens = model.generate(ids, **media, max_new_tokens=args.max_new_tokens, do_sample=False)
    summary = {
        "clip": str(clip),
        "frames_decoded": int(decoded.frames.shape[0]),
        "frame_size_hw": list(decoded.size),
        "frames_kept": int(visual.kept_indices.numel()),
        "kept_frame_indices": " ".join(map(str, visual.kept_indices.tolist())),
        "regime": visual.regime,
        "visual_tokens": int(visual.tokens.shape[0]),
        "answer_ids": new_tokens[0].tolist(),
        "answer (random tiny model)": tokenizer.decode(new_tokens[0]),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0
