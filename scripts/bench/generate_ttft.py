#!/usr/bin/env python
"""Time to first token of `LongVUForCausalLM.generate` for long 1-fps videos, at the released shapes.

    python scripts/bench/generate_ttft.py [--minutes 10 60] [--modes pixels frames compile fp8 nf4]
    python scripts/bench/generate_ttft.py --video FILE.mp4 [--make-video 60]   # + file -> first token
    python scripts/bench/generate_ttft.py --tiny        # the same code path on the tiny model, on the CPU

Random weights: SigLIP-so400m-384, DINOv2-giant, SVA/projector and the full 28-layer Qwen2-7B LLM
(`scripts/bench/vision_pipeline.released_shape_config(28)`). Each video is `minutes * 60` decoded
frames (uint8, 216x384 = a 16:9 frame at the decoder's 384-px long side) of synthetic scenes, held in
host memory as `data.video.decode_video` returns them. The prompt is a Qwen chat prompt of realistic
length (system + question, ~60 tokens) with one video placeholder. Modes, run in the order given, on one
model (each changes it for the modes after it):

- `pixels`: before this issue's work: both towers' full-clip bf16 pixel tensors already on the GPU
  (made there from the frames, outside the clock), as `longvu generate` held them;
- `frames`: the uint8 frames go in; each DINO/SigLIP chunk is moved, preprocessed and encoded on the
  GPU (`longvu.visual`): decoded frames -> first token, preprocessing included;
- `compile`: `frames` with both towers under torch.compile (compiled in the untimed warm-up);
- `fp8`: `compile` with the towers' linear layers in FP8 (`longvu.fp8`, `torch._scaled_mm`);
- `nf4`: the towers as the previous mode left them, the LLM's decoder weights in 4-bit NF4
  (`longvu.quantize`, torchao).
`agree` is the Jaccard index of a mode's kept frames against those of the first bf16 mode run
(`pixels`, `frames` or `compile`) on the same video.

Per video and mode: vision seconds (towers + SVA + projector + regime/STC, timed inside generate),
first-token seconds (`generate(max_new_tokens=1)`), peak GPU memory allocated / reserved. With
`--cpu-preprocess N`, the rate of the CPU preprocessing `longvu generate` used before (N frames).
With `--video`, decode frames/s per backend (PyAV sequential -- also with the unsampled
non-reference frames decoded, as before `data.video` skipped them -- and with decoder threads on
`--sequential-minutes` of it, parallel processes on the whole file), file -> first token = parallel
decode + the last mode's first token, and file -> first token with decoding overlapping the towers
(`data.parallel_decode.start_decode`). `--make-video M` first writes an M-minute 720p 30-fps H.264
file to `--video` in background processes (scripts/bench/make_long_video.py, one segment per core)
while the model is built; the timed modes start once it is written.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from longvu.constants import IMAGE_TOKEN_INDEX, QWEN_ASSISTANT_HEADER_IDS  # noqa: E402
from longvu.modeling import LongVUForCausalLM  # noqa: E402
from longvu.processing import tower_pixels  # noqa: E402
from longvu.towers import speed_up_towers  # noqa: E402
from longvu.visual import encode_media  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("pixels", "frames", "compile", "fp8", "nf4")
BF16_MODES = ("pixels", "frames", "compile")
IM_START, IM_END, NEWLINE = 151644, 151645, 198


def prompt_ids(question_tokens: int, seed: int) -> list[int]:
    """A chat-shaped prompt: <|im_start|>system ... <|im_end|>\\n<|im_start|>user <video> \\n question
    <|im_end|>\\n<|im_start|>assistant\\n, with random ordinary tokens for the words."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(1000, 100000, (n,), generator=g).tolist()  # noqa: E731
    return ([IM_START, *words(12), IM_END, NEWLINE, IM_START, *words(1), NEWLINE, IMAGE_TOKEN_INDEX, NEWLINE,
             *words(question_tokens), IM_END, NEWLINE] + list(QWEN_ASSISTANT_HEADER_IDS))


def scene_frames_u8(frames: int, scenes: int, height: int, width: int, device, seed: int = 0) -> torch.Tensor:
    """uint8 [frames, height, width, 3] in host memory: `scenes` smooth random images, each held for
    frames/scenes frames, with per-frame noise of ~8 grey levels (made on `device`)."""
    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.rand(scenes, 3, height // 16, width // 16, generator=g, device=device) * 255
    base = F.interpolate(base, size=(height, width), mode="bicubic", align_corners=False)
    out = torch.empty(frames, height, width, 3, dtype=torch.uint8)
    per = -(-frames // scenes)
    for start in range(0, frames, 256):
        idx = torch.arange(start, min(frames, start + 256), device=device) // per
        chunk = base[idx] + 8 * torch.randn(idx.numel(), 3, height, width, generator=g, device=device)
        out[start:start + idx.numel()] = chunk.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return out


def pixel_media(frames: torch.Tensor, config, device, dtype) -> dict:
    """Both towers' full-clip pixels on the device, as `longvu generate` held them before streaming."""
    def tower(name, size):
        return torch.cat([tower_pixels(frames[s:s + 256].to(device), name, size).to(dtype)
                          for s in range(0, frames.shape[0], 256)])

    return dict(pixel_values_siglip=[tower("siglip", config.siglip_image_size)],
                pixel_values_dino=[tower("dino", config.dino_image_size)], media_sizes=[(360, 640)],
                media_kinds=["video"])


def frame_media(frames: torch.Tensor, size=(360, 640)) -> dict:
    return dict(pixel_values_siglip=[frames], pixel_values_dino=[frames], media_sizes=[size], media_kinds=["video"])


def build_model(tiny: bool, device, dtype) -> LongVUForCausalLM:
    if tiny:
        from longvu.tiny import tiny_model

        return tiny_model("video", dtype=dtype, compat_swap_video_hw=True, compat_dot_product_scoring=True).to(device)
    from vision_pipeline import released_shape_config

    with torch.device(device):
        model = LongVUForCausalLM(released_shape_config(28))
    return model.to(dtype).eval()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class TimedEncoder:
    """`media_encoder` = encode_media, timed (device synchronised); remembers the kept frames."""

    def __init__(self, device):
        self.device, self.seconds, self.kept = device, 0.0, None

    def __call__(self, model, items, texts):
        sync(self.device)
        start = time.perf_counter()
        out = encode_media(model, items, texts)
        sync(self.device)
        self.seconds = time.perf_counter() - start
        self.kept = out[0].kept_indices.cpu()
        return out


@torch.no_grad()
def measure(model, media: dict, device, question_tokens: int) -> dict:
    ids = torch.tensor([prompt_ids(question_tokens, seed=0)], device=device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    encoder = TimedEncoder(device)
    sync(device)
    start = time.perf_counter()
    out = model.generate(ids, **media, media_encoder=encoder, max_new_tokens=1, do_sample=False,
                         return_dict_in_generate=True)
    sync(device)
    ttft = time.perf_counter() - start
    stats = out.media
    return {"frames": stats.frames_in[0], "kept": stats.frames_kept[0], "visual_tokens": stats.visual_tokens[0],
            "seq_len": stats.sequence_lengths[0], "regime": stats.regimes[0], "vision_s": encoder.seconds,
            "ttft_s": ttft, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan"),
            "kept_set": set(encoder.kept.tolist())}


def apply_mode(model, mode: str) -> None:
    """Switch the model to `mode`, from what the modes before it left."""
    if mode in ("compile", "fp8"):
        speed_up_towers(model.model.towers, fp8=mode == "fp8", compile=True)
    elif mode == "nf4":
        from longvu.quantize import quantize_llm_nf4

        quantize_llm_nf4(model)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


COLS = [("mode", 8, "{}"), ("video", 8, "{}"), ("frames", 7, "{}"), ("kept", 5, "{}"), ("agree", 5, "{:.3f}"),
        ("visual_tokens", 13, "{}"), ("vision_s", 8, "{:.2f}"), ("ttft_s", 7, "{:.2f}"), ("peak_gib", 8, "{:.1f}"),
        ("reserved_gib", 12, "{:.1f}"), ("warmup_s", 8, "{:.1f}")]


def print_table(rows: list[dict], title: str) -> None:
    print(title)
    print("| " + " | ".join(f"{c:>{w}}" for c, w, _ in COLS) + " |")
    print("|" + "|".join("-" * (w + 2) for _, w, _ in COLS) + "|")
    for r in rows:
        print("| " + " | ".join(f"{(f.format(r[c]) if c in r else '-'):>{w}}" for c, w, f in COLS) + " |")
    sys.stdout.flush()


def cpu_preprocess_rate(frames: torch.Tensor) -> float:
    """Frames/s of `longvu.processing.preprocess_frames` on the CPU (both towers), the pre-streaming path."""
    from longvu.processing import preprocess_frames

    start = time.perf_counter()
    preprocess_frames(frames)
    return frames.shape[0] / (time.perf_counter() - start)


def file_rows(path: str, sequential_minutes: float, report) -> tuple[list[dict], object]:
    """Decode benchmarks on `path` at 1 fps: PyAV sequential on its first minutes, parallel processes on
    all of it -> (rows, the parallel DecodedFrames). `report(row)` hears of each row as it is measured."""
    from data.parallel_decode import decode_video_parallel
    from data.video import SamplingConfig, decode_video, reduced_size

    cfg = SamplingConfig(video_fps=1.0, max_frames=None, backend="pyav", fallback=False)
    rows = []

    def add(row):
        row["source_fps"] = row["source_frames"] / row["seconds"]
        row["out_fps"] = row["frames_out"] / row["seconds"]
        rows.append(row)
        report(row)

    start = time.perf_counter()
    seq = decode_video(path, cfg, end=sequential_minutes * 60)
    s = time.perf_counter() - start
    add({"backend": "pyav sequential", "span_min": sequential_minutes, "frames_out": len(seq.indices),
         "source_frames": int(seq.indices[-1]) + 1, "seconds": s})
    from decode_nonref import decode as decode_every_frame

    _, s = decode_every_frame(path, seq.indices, seq.native_fps, reduced_size(seq.size, cfg.max_side), skip=False)
    add({"backend": "pyav sequential, non-reference frames decoded too", "span_min": sequential_minutes,
         "frames_out": len(seq.indices), "source_frames": int(seq.indices[-1]) + 1, "seconds": s})
    threads = os.cpu_count() or 1
    start = time.perf_counter()
    seq = decode_video(path, SamplingConfig(video_fps=1.0, max_frames=None, backend="pyav", fallback=False,
                                            decode_threads=threads), end=sequential_minutes * 60)
    s = time.perf_counter() - start
    add({"backend": f"pyav {threads} decoder threads", "span_min": sequential_minutes,
         "frames_out": len(seq.indices), "source_frames": int(seq.indices[-1]) + 1, "seconds": s})
    workers = os.cpu_count() or 1
    start = time.perf_counter()
    par = decode_video_parallel(path, cfg, workers=workers, executor="process")
    s = time.perf_counter() - start
    add({"backend": f"pyav {workers} processes", "span_min": par.n_total / par.native_fps / 60,
         "frames_out": len(par.indices), "source_frames": par.n_total, "seconds": s})
    return rows, par


def file_part(model, args, device, emit) -> None:
    """Decode benchmarks on args.video, then file -> first token with the model as it is now."""

    def report(r):
        emit(r)
        print(f"decode {r['backend']}: {r['frames_out']} frames out of {r['source_frames']} source frames "
              f"({r['span_min']:.1f} min) in {r['seconds']:.1f} s: {r['source_fps']:.0f} source frames/s, "
              f"{r['out_fps']:.0f} sampled frames/s", flush=True)

    decode, decoded = file_rows(args.video, args.sequential_minutes, report)
    media = frame_media(torch.from_numpy(decoded.frames), tuple(decoded.size))
    row = {"mode": "file", "video": f"{decode[-1]['span_min']:.0f} min", **measure(model, media, device,
                                                                                  args.question_tokens)}
    row["file_to_first_token_s"] = decode[-1]["seconds"] + row["ttft_s"]
    emit(row)
    print_table([row], f"file {args.video}: decode {decode[-1]['seconds']:.1f} s + first token "
                       f"{row['ttft_s']:.2f} s = file -> first token {row['file_to_first_token_s']:.2f} s")
    from data.parallel_decode import start_decode
    from data.video import SamplingConfig

    start = time.perf_counter()
    frames, facts = start_decode(args.video, SamplingConfig(video_fps=1.0, max_frames=None), os.cpu_count(),
                                 segments_per_worker=4)
    row = {"mode": "overlap", "video": row["video"], **measure(model, frame_media(frames, tuple(facts.size)), device,
                                                                args.question_tokens)}
    row["file_to_first_token_s"] = time.perf_counter() - start
    row["decode_s"] = frames.seconds
    emit(row)
    print_table([row], f"file {args.video}, decoding overlapped with the towers: decode {frames.seconds:.1f} s, "
                       f"file -> first token {row['file_to_first_token_s']:.2f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 60], help="video lengths at 1 fps")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--scenes-per-minute", type=float, default=2.0)
    parser.add_argument("--question-tokens", type=int, default=40)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 --tiny")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (checks the code path)")
    parser.add_argument("--cpu-preprocess", type=int, default=0, help="time CPU preprocessing on N frames")
    parser.add_argument("--video", help="a video file: decode backends and file -> first token")
    parser.add_argument("--make-video", type=float, default=0, help="first write a MIN-minute 720p30 file to --video")
    parser.add_argument("--sequential-minutes", type=float, default=2, help="span of the sequential decode")
    parser.add_argument("--file-mode", choices=MODES, help="run the file part after this mode (default: the last)")
    parser.add_argument("--json-out", help="append every row as JSON to this file")
    parser.add_argument("--stack-dump-s", type=float, default=0,
                        help="print every thread's stack to stderr every N s (finding where a run stalls)")
    args = parser.parse_args(argv)
    if args.stack_dump_s:
        faulthandler.dump_traceback_later(args.stack_dump_s, repeat=True)
    device = args.device or ("cpu" if args.tiny else "cuda")
    dtype = DTYPES[args.dtype or ("fp32" if args.tiny else "bf16")]
    maker = None
    if args.make_video:
        maker = subprocess.Popen([sys.executable, str(Path(__file__).with_name("make_long_video.py")), args.video,
                                  "--minutes", str(args.make_video), "--workers", str(os.cpu_count() or 1)])
    model = build_model(args.tiny, device, dtype)
    where = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "CPU"
    print(f"attention: {model.model.towers[1].vision_tower.config._attn_implementation}", flush=True)
    if maker is not None:  # written before any timing, so the encoders do not share the CPU with a timed run
        start = time.perf_counter()
        if maker.wait() != 0:
            print("making the video failed", flush=True)
            return 1
        print(f"waited {time.perf_counter() - start:.1f} s for the video after building the model", flush=True)

    def emit(row):
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps({k: v for k, v in row.items() if k != "kept_set"}) + "\n")

    if args.cpu_preprocess:
        rate = cpu_preprocess_rate(scene_frames_u8(args.cpu_preprocess, 4, 216, 384, device))
        print(f"CPU preprocessing (preprocess_frames, {torch.get_num_threads()} threads): {rate:.0f} frames/s "
              f"({3600 / rate:.1f} s for 3600 frames)", flush=True)
        emit({"cpu_preprocess_fps": rate, "threads": torch.get_num_threads()})
    clips = {m: scene_frames_u8(int(round(m * 60)), max(1, int(m * args.scenes_per_minute)), 216, 384, device)
             for m in args.minutes}
    warm = scene_frames_u8(60, 2, 216, 384, device)
    rows, reference = [], {}
    file_mode = args.file_mode or args.modes[-1]
    for mode in args.modes:
        start = time.perf_counter()
        try:
            apply_mode(model, mode)
        except Exception as err:  # an optional lever (torchao) that does not run here: say so, go on
            print(f"mode {mode} unavailable: {type(err).__name__}: {err}", flush=True)
            continue
        media_of = (lambda f: pixel_media(f, model.config, device, dtype)) if mode == "pixels" else frame_media
        measure(model, media_of(warm), device, args.question_tokens)
        warmup_s = time.perf_counter() - start
        for minutes, frames in clips.items():
            media = media_of(frames)
            row = {"mode": mode, "video": f"{minutes:g} min", "warmup_s": warmup_s,
                   **measure(model, media, device, args.question_tokens)}
            del media
            if mode in BF16_MODES and minutes not in reference:
                reference[minutes] = row["kept_set"]
            if minutes in reference:
                row["agree"] = jaccard(row["kept_set"], reference[minutes])
            rows.append(row)
            emit(row)
            print_table(rows[-1:], f"{mode} {minutes:g} min")
        if args.video and mode == file_mode:
            file_part(model, args, device, emit)
    print_table(rows, f"LongVU time to first token ({'tiny' if args.tiny else 'released shapes, 28-layer LLM'}, "
                      f"random weights, {str(dtype).removeprefix('torch.')}, {where}; decoded frames in host memory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
