"""`longvu generate --model DIR (--video FILE | --image FILE) --question TEXT`: answer questions about a
video or an image with any LongVU model directory (see `train.model_dir`).

The answer streams to stdout token by token (transformers' TextStreamer). `--json` prints one JSON
object per question instead: the answer, frames decoded / kept and the visual token count.
`--interactive` reads one question per line from stdin (after `--question`, if given) and encodes the
media once (`longvu.media_cache.MediaCache`): the towers, SVA and projector run for the first question
only, unless a question's length changes whether temporal reduction applies.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="answer questions about a video or image with a model directory")
    parser.add_argument("--model", required=True, type=Path, help="a model directory: ours, an export, or an original LongVU one")
    media = parser.add_mutually_exclusive_group(required=True)
    media.add_argument("--video", help="a video file, GIF or frame folder")
    media.add_argument("--image", help="an image file")
    parser.add_argument("--question", help="the question (default: none; required unless --interactive)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap, in tokens")
    parser.add_argument("--video-fps", type=float, default=1.0, help="frames sampled per second of video")
    parser.add_argument("--max-frames", type=int, default=1000, help="cap on sampled frames (uniform subsampling)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--siglip-path", help="SigLIP tower folder, for original directories and exports without "
                                              "towers (default: the folder the model's config.json names)")
    parser.add_argument("--dino-path", help="DINOv2 tower folder (default: as for --siglip-path)")
    parser.add_argument("--json", action="store_true", help="print JSON (answer, frames decoded/kept, visual tokens)")
    parser.add_argument("--interactive", action="store_true", help="more questions from stdin, one per line; media encoded once")
    parser.set_defaults(func=run)


@dataclass
class Media:
    """Preprocessed media: siglip [T,3,S,S], dino [T,3,D,D] on the model's device and dtype."""

    siglip: object
    dino: object
    size: tuple[int, int]
    kind: str
    frames_decoded: int

    def kwargs(self) -> dict:
        return dict(pixel_values_siglip=[self.siglip], pixel_values_dino=[self.dino], media_sizes=[self.size],
                    media_kinds=[self.kind])


def load_media(config, video: str | None, image: str | None, video_fps: float, max_frames: int | None,
               device, dtype) -> Media:
    """Decode (video: sampled at `video_fps`, capped at `max_frames`) and preprocess for both towers."""
    from data.video import SamplingConfig, decode_video, load_image_array
    from longvu.processing import FrameSize, preprocess_frames

    if video is not None:
        decoded = decode_video(video, SamplingConfig(video_fps=video_fps, max_frames=max_frames))
        frames, size, kind = decoded.frames, decoded.size, "video"
    else:
        pixels = load_image_array(image)
        frames, size, kind = pixels[None], FrameSize(*pixels.shape[:2]), "image"
    siglip, dino = preprocess_frames(frames, config.siglip_image_size, config.dino_image_size)
    return Media(siglip.to(device, dtype), dino.to(device, dtype), size, kind, int(frames.shape[0]))


class Answerer:
    """A loaded model + tokenizer + one media item; `ask(question)` answers (streaming or not)."""

    def __init__(self, model, tokenizer, media: Media, max_new_tokens: int):
        from longvu.media_cache import MediaCache

        self.model, self.tokenizer, self.media = model, tokenizer, media
        self.max_new_tokens = max_new_tokens
        self.cache = MediaCache()

    def ask(self, question: str, stream: bool) -> dict:
        import torch
        from transformers import TextStreamer

        from longvu.processing import build_prompt_ids

        device = self.media.siglip.device
        ids = torch.tensor([build_prompt_ids(self.tokenizer, question)], device=device)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        out = self.model.generate(ids, **self.media.kwargs(), media_encoder=self.cache, streamer=streamer,
                                  max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id, return_dict_in_generate=True)
        new, stats = out.sequences, out.media
        return {"question": question, "answer": self.tokenizer.decode(new[0], skip_special_tokens=True),
                "media_kind": self.media.kind, "frames_decoded": self.media.frames_decoded,
                "frames_kept": sum(stats.frames_kept), "visual_tokens": sum(stats.visual_tokens),
                "new_tokens": int(new.shape[1])}


def _questions(args: argparse.Namespace):
    if args.question is not None:
        yield args.question
    if args.interactive:
        if sys.stdin.isatty():
            print("questions, one per line (Ctrl-D ends):", file=sys.stderr)
        for line in sys.stdin:
            if line.strip():
                yield line.rstrip("\n")


def run(args: argparse.Namespace) -> int:
    import torch

    from data.errors import MediaError
    from train.model_dir import ModelDirError, load_dir_tokenizer, load_model_dir
    from train.model_setup import DTYPES

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.question is None and not args.interactive:
        print("longvu generate: give --question, or --interactive to read questions from stdin", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    try:
        model = load_model_dir(args.model, args.siglip_path, args.dino_path, dtype=dtype).to(device)
    except (ModelDirError, FileNotFoundError, ValueError, OSError) as err:
        print(f"longvu generate: cannot load {args.model}: {err}", file=sys.stderr)
        return 2
    tokenizer = load_dir_tokenizer(args.model)
    try:
        media = load_media(model.config, args.video, args.image, args.video_fps, args.max_frames, device, dtype)
    except MediaError as err:
        print(f"longvu generate: {err}", file=sys.stderr)
        return 2
    answerer = Answerer(model, tokenizer, media, args.max_new_tokens)
    for question in _questions(args):
        result = answerer.ask(question, stream=not args.json)
        if args.json:
            print(json.dumps(result, ensure_ascii=False), flush=True)
        else:
            print(f"[{result['frames_kept']}/{result['frames_decoded']} frames kept, "
                  f"{result['visual_tokens']} visual tokens]", file=sys.stderr, flush=True)
    return 0
