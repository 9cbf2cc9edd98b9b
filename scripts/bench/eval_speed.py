#!/usr/bin/env python
"""Seconds per question of `longvu eval`'s model step, at the released shapes, random weights.

    python scripts/bench/eval_speed.py [--dtype bf16] [--warmup]
    python scripts/bench/eval_speed.py --tiny          # the same code path on the tiny model, on the CPU

Three cases, as the benchmarks' protocols sample them (train.evaluation): a 16-frame MVBench clip
(8 s at 2 fps), a 60-s VideoMME-style video and a 1-hour one (0.5 fps: 30 and 1800 frames). Frames
are synthetic scenes as uint8 360x640 frames in host memory, as `longvu eval` decodes them (decoding
not timed; the model preprocesses them on the device); each video gets
three MCQ prompts (VideoMME's three questions per video) with that benchmark's thresholds applied
(drop 0.8 for MVBench, 0.65 for VideoMME). Per question: greedy generation of 5 new tokens stopping
at <|im_end|>, as `longvu eval` runs it; the first question encodes the video, the next two reuse
it through `longvu.media_cache.MediaCache`. Random weights (`generate_ttft.build_model`: 28-layer
Qwen2-7B LLM, SigLIP-so400m, DINOv2-giant) never emit <|im_end|> early, so each question costs its
full 5 tokens. One table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate_ttft import DTYPES, build_model, frame_media, prompt_ids, scene_frames_u8, sync  # noqa: E402

from longvu.media_cache import MediaCache  # noqa: E402
from train.evaluation import mvbench, videomme  # noqa: E402
from train.evaluation.protocol import MAX_NEW_TOKENS  # noqa: E402

IM_END = 151645
# (name, frames, scenes, protocol): the sampled frame counts of each benchmark's protocol
CASES = [("MVBench clip, 16 frames", 16, 2, mvbench.PROTOCOL),
         ("VideoMME 60 s, 0.5 fps", 30, 3, videomme.PROTOCOL),
         ("VideoMME 1 h, 0.5 fps", 1800, 60, videomme.PROTOCOL)]
QUESTION_TOKENS = 80  # "Question: ...\nOptions:\n(A) ...(D) ...\nRespond with only the letter ..."


def _answer(model, ids, media, cache) -> tuple[int, object]:
    out = model.generate(ids, **media, media_encoder=cache, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                         eos_token_id=IM_END, pad_token_id=IM_END, return_dict_in_generate=True)
    return out.sequences.shape[1], out.media


@torch.no_grad()
def measure(model, name: str, frames: int, scenes: int, protocol, device) -> dict:
    """Time three questions on one video: the first encodes it, the others hit the cache."""
    for key, value in protocol.overrides.items():  # the benchmark's thresholds, as `longvu eval` sets them
        setattr(model.config, key, value)
    media = frame_media(scene_frames_u8(frames, scenes, 360, 640, device))  # uint8 in host memory, as decoded
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cache, times, stats, tokens = MediaCache(), [], None, []
    for seed in range(3):
        ids = torch.tensor([prompt_ids(QUESTION_TOKENS, seed=seed)], device=device)
        sync(device)
        start = time.perf_counter()
        n_new, stats_q = _answer(model, ids, media, cache)
        sync(device)
        times.append(time.perf_counter() - start)
        tokens.append(n_new)
        stats = stats or stats_q
    return {"case": name, "frames": frames, "kept": sum(stats.frames_kept), "visual_tokens": sum(stats.visual_tokens),
            "new_tokens": max(tokens), "first_s": times[0], "cached_s": sum(times[1:]) / 2,
            "per_question_s": sum(times) / 3, "encodes": cache.encodes,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}


def print_table(rows: list[dict], title: str) -> None:
    print(title)
    cols = [("case", 24, "{}"), ("frames", 6, "{}"), ("kept", 5, "{}"), ("visual_tokens", 13, "{}"),
            ("new_tokens", 10, "{}"), ("first_s", 8, "{:.2f}"), ("cached_s", 8, "{:.2f}"),
            ("per_question_s", 14, "{:.2f}"), ("encodes", 7, "{}"), ("peak_gib", 8, "{:.1f}")]
    print("| " + " | ".join(f"{c:>{w}}" for c, w, _ in cols) + " |")
    print("|" + "|".join("-" * (w + 2) for _, w, _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(f"{f.format(r[c]):>{w}}" for c, w, f in cols) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 --tiny")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (checks the code path)")
    parser.add_argument("--warmup", action="store_true", help="one untimed MVBench-sized case first")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    dtype = DTYPES[args.dtype or ("fp32" if args.tiny else "bf16")]
    model = build_model(args.tiny, device, dtype)
    if args.warmup:
        measure(model, *CASES[0], device)
    rows = [measure(model, *case, device) for case in CASES]
    where = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "CPU"
    print_table(rows, f"longvu eval: seconds per question ({'tiny' if args.tiny else 'released shapes, 28-layer LLM'}, "
                      f"random weights, {str(dtype).removeprefix('torch.')}, {where}; 3 questions per video)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
