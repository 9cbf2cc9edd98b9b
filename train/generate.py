"""`longvu generate --model DIR (--video FILE | --image FILE) --question TEXT`: answer questions about a
video or an image with any LongVU model directory (see `train.model_dir`).

The answer streams to stdout token by token (transformers' TextStreamer). `--json` prints one JSON
object per question instead: the answer, frames decoded / kept, the visual token count and the
timings (decode, vision, prefill, first token, total). Progress (decode, vision, prefill) goes to stderr.

Videos are decoded by `--decode-workers` parallel PyAV decoders over segments (`data.parallel_decode`;
1: `data.video.decode_video`) into uint8 frames in host memory; the vision pipeline moves,
preprocesses and encodes them on the model's device one chunk at a time, starting on the first
segments while later ones still decode. `--compile-towers` runs the towers under torch.compile
(about a minute of compiling first), `--fp8-towers` their linear layers in FP8 (`longvu.fp8`; fast
on Ada/Hopper GPUs; always compiled: uncompiled FP8 is slower than bf16); `--llm-4bit` keeps the
LLM's decoder weights in 4-bit NF4 (`longvu.quantize`, torchao).
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
    parser.add_argument("--json", action="store_true", help="print JSON (answer, frames decoded/kept, visual tokens, timings)")
    parser.add_argument("--interactive", action="store_true", help="more questions from stdin, one per line; media encoded once")
    parser.add_argument("--decode-workers", type=int, default=0,
                        help="parallel video decoders (default: one per CPU core; 1: sequential)")
    parser.add_argument("--compile-towers", action="store_true", help="run the vision towers under torch.compile")
    parser.add_argument("--fp8-towers", action="store_true",
                        help="vision towers' linear layers in FP8, compiled (a GPU of compute capability 8.9+)")
    parser.add_argument("--llm-4bit", action="store_true", help="LLM decoder weights in 4-bit NF4 (torchao)")
    parser.set_defaults(func=run)


class StageLog:
    """Progress of the long stages on stderr: a line per stage, updated in place on a terminal."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()

    def update(self, stage: str, done: int, total: int, unit: str) -> None:
        if self.live:
            print(f"\r{stage}: {done}/{total} {unit}", end="", file=self.stream, flush=True)

    def done(self, line: str) -> None:
        print(("\r" if self.live else "") + line, file=self.stream, flush=True)


@dataclass
class Media:
    """Decoded media: `frames` uint8 [T, h, w, 3] in host memory (a tensor, or `DecodingFrames` still
    being written), the original size, the kind; `read_s`: the decode seconds of a finished tensor."""

    frames: object
    size: tuple[int, int]
    kind: str
    read_s: float | None = None

    @property
    def frames_decoded(self) -> int:
        return int(self.frames.shape[0])

    @property
    def decode_s(self) -> float:
        """Wall time of decoding (frames still decoding: waits for the last segment)."""
        if self.read_s is None:
            self.frames.wait()
            return self.frames.seconds
        return self.read_s

    def kwargs(self) -> dict:
        return dict(pixel_values_siglip=[self.frames], pixel_values_dino=[self.frames], media_sizes=[self.size],
                    media_kinds=[self.kind])


def load_media(video: str | None, image: str | None, video_fps: float, max_frames: int | None,
               workers: int = 0, log: StageLog | None = None) -> Media:
    """Decode (video: sampled at `video_fps`, capped at `max_frames`; a video file by `workers` parallel
    decoders, returning while they run)."""
    import os
    import time

    import torch

    from data.parallel_decode import start_decode
    from data.video import SamplingConfig, decode_video, load_image_array
    from longvu.processing import FrameSize

    start = time.perf_counter()
    if video is not None:
        cfg = SamplingConfig(video_fps=video_fps, max_frames=max_frames)
        container = os.path.isfile(video) and not video.lower().endswith((".gif", ".npy"))
        if container and workers != 1:
            def on_segment(done: int, total: int) -> None:
                if log:
                    log.update("decode", done, total, "frames")
                    if done == total:
                        log.done(f"decode: {total} frames in {time.perf_counter() - start:.1f} s")

            frames, decoded = start_decode(video, cfg, workers or None, on_segment=on_segment, segments_per_worker=4)
            return Media(frames, tuple(decoded.size), "video")
        decoded = decode_video(video, cfg)
        frames, size, kind = decoded.frames, decoded.size, "video"
    else:
        pixels = load_image_array(image)
        frames, size, kind = pixels[None], FrameSize(*pixels.shape[:2]), "image"
    media = Media(torch.from_numpy(frames), tuple(size), kind, time.perf_counter() - start)
    if log:
        log.done(f"decode: {media.frames_decoded} frames in {media.read_s:.1f} s")
    return media


class _Timed:
    """Wraps a media encoder: seconds of its last call (device synchronised), told to `log`."""

    def __init__(self, encoder, sync, log: StageLog | None):
        self.encoder, self.sync, self.log, self.seconds = encoder, sync, log, 0.0

    def __call__(self, model, items, texts):
        import time

        start = time.perf_counter()
        out = self.encoder(model, items, texts)
        self.sync()
        self.seconds = time.perf_counter() - start
        if self.log:
            kept = sum(r.kept_indices.numel() for r in out)
            frames = sum(r.frames_in for r in out)
            self.log.done(f"vision: {kept}/{frames} frames kept, {sum(r.tokens.shape[0] for r in out)} visual "
                          f"tokens in {self.seconds:.1f} s; prefill ...")
        return out


class _FirstToken:
    """A streamer that notes when the first new token arrives and passes everything on to `inner`."""

    def __init__(self, inner=None):
        import time

        self.inner, self.start, self.first, self._puts = inner, time.perf_counter(), None, 0

    def put(self, value) -> None:
        import time

        self._puts += 1
        if self._puts == 2:  # the first put is the prompt
            self.first = time.perf_counter() - self.start
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


class Answerer:
    """A loaded model + tokenizer + one media item; `ask(question)` answers (streaming or not)."""

    def __init__(self, model, tokenizer, media: Media, max_new_tokens: int, log: StageLog | None = None):
        import torch

        from longvu.media_cache import MediaCache

        self.model, self.tokenizer, self.media = model, tokenizer, media
        self.max_new_tokens = max_new_tokens
        self.log = log
        progress = (lambda stage, done, total: log.update(f"vision ({stage})", done, total, "frames")) if log else None
        self.cache = MediaCache(progress=progress)
        device = model.device
        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def ask(self, question: str, stream: bool) -> dict:
        import time

        import torch
        from transformers import TextStreamer

        from longvu.processing import build_prompt_ids

        ids = torch.tensor([build_prompt_ids(self.tokenizer, question)], device=self.model.device)
        text = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        encoder = _Timed(self.cache, self.sync, self.log)
        streamer = _FirstToken(text)
        out = self.model.generate(ids, **self.media.kwargs(), media_encoder=encoder, streamer=streamer,
                                  max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id, return_dict_in_generate=True)
        total = time.perf_counter() - streamer.start
        new, stats = out.sequences, out.media
        first = streamer.first if streamer.first is not None else total
        timings = {"decode_s": self.media.decode_s, "vision_s": encoder.seconds,
                   "prefill_s": max(0.0, first - encoder.seconds), "first_token_s": first, "generate_s": total}
        if self.log:
            self.log.done(f"prefill: {stats.sequence_lengths[0]} tokens in {timings['prefill_s']:.1f} s; first token "
                          f"after {first:.1f} s")
        return {"question": question, "answer": self.tokenizer.decode(new[0], skip_special_tokens=True),
                "media_kind": self.media.kind, "frames_decoded": self.media.frames_decoded,
                "frames_kept": sum(stats.frames_kept), "visual_tokens": sum(stats.visual_tokens),
                "new_tokens": int(new.shape[1]), "timings": timings}


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
    from longvu.fp8 import require_fp8_units
    from longvu.towers import speed_up_towers
    from train.model_dir import ModelDirError, inference_placement, load_dir_tokenizer, load_model_dir

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.question is None and not args.interactive:
        print("longvu generate: give --question, or --interactive to read questions from stdin", file=sys.stderr)
        return 2
    device, dtype = inference_placement(args.device, args.dtype)
    try:
        model = load_model_dir(args.model, args.siglip_path, args.dino_path, dtype=dtype).to(device)
    except (ModelDirError, FileNotFoundError, ValueError, OSError) as err:
        print(f"longvu generate: cannot load {args.model}: {err}", file=sys.stderr)
        return 2
    tokenizer = load_dir_tokenizer(args.model)
    try:
        if args.llm_4bit:
            from longvu.quantize import quantize_llm_nf4

            quantize_llm_nf4(model)
        if args.fp8_towers:
            require_fp8_units(device)
        speed_up_towers(model.model.towers, fp8=args.fp8_towers, compile=args.compile_towers)
    except (RuntimeError, ValueError) as err:
        print(f"longvu generate: {err}", file=sys.stderr)
        return 2
    log = StageLog()
    try:
        media = load_media(args.video, args.image, args.video_fps, args.max_frames, args.decode_workers, log)
    except MediaError as err:
        print(f"longvu generate: {err}", file=sys.stderr)
        return 2
    answerer = Answerer(model, tokenizer, media, args.max_new_tokens, log)
    for question in _questions(args):
        try:
            result = answerer.ask(question, stream=not args.json)
        except MediaError as err:  # a segment that failed while decoding alongside the towers
            print(f"longvu generate: {err}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(result, ensure_ascii=False), flush=True)
        else:
            print(f"[{result['frames_kept']}/{result['frames_decoded']} frames kept, "
                  f"{result['visual_tokens']} visual tokens]", file=sys.stderr, flush=True)
    return 0
