"""Benchmark: decode + preprocess throughput on one CPU core, decord vs PyAV.

Writes a 720p clip (default 60 s at 30 fps, H.264, keyframe every 250 frames) with PyAV, then for each
backend and decode size (reduced to the towers' 384 px, or native) samples it at ``--video-fps``
and preprocesses the frames for both towers (SigLIP 384, DINOv2 378). Prints one table of frames/s
(sampled frames out per second of wall time; the decoder still has to decode every frame of each
GOP up to a sampled one).

    python scripts/bench/data_pipeline.py [--seconds 60] [--fps 30] [--video-fps 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from data.video import SamplingConfig, decode_video  # noqa: E402
from longvu.processing import preprocess_frames  # noqa: E402


def write_clip(path: str, seconds: int, fps: int, height: int = 720, width: int = 1280) -> None:
    """A textured colour gradient panning sideways, so the encoder and decoder do real work."""
    import av

    rng = np.random.default_rng(0)
    span = width + 1024
    y, x = np.mgrid[0:height, 0:span].astype(np.float32)
    base = np.stack([x % 256, (y + x / 3) % 256, (x + y) / 2 % 256], axis=-1)
    base = (base + rng.integers(0, 12, (height, span, 1))).clip(0, 255).astype(np.uint8)
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"preset": "veryfast", "g": "250"}
        for i in range(seconds * fps):
            off = (4 * i) % 1024
            frame = np.ascontiguousarray(base[:, off : off + width])
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def run_case(path: str, backend: str, max_side: int | None, video_fps: float, repeats: int) -> dict:
    """Best-of-``repeats`` timings of decode and preprocess for one configuration."""
    cfg = SamplingConfig(video_fps=video_fps, backend=backend, fallback=False, max_side=max_side, max_frames=None)
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        decoded = decode_video(path, cfg)
        t1 = time.perf_counter()
        preprocess_frames(decoded.frames)
        t2 = time.perf_counter()
        if best is None or t2 - t0 < best["total"]:
            best = {"frames": len(decoded.frames), "shape": decoded.frames.shape[1:3], "decode": t1 - t0,
                    "preprocess": t2 - t1, "total": t2 - t0}
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--video-fps", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clip", default=None, help="use this clip instead of writing one")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.clip or os.path.join(tmp, "bench_720p.mp4")
        if not args.clip:
            t0 = time.perf_counter()
            write_clip(path, args.seconds, args.fps)
            print(f"wrote {path}: {args.seconds} s, {args.fps} fps, 1280x720 "
                  f"({os.path.getsize(path) / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
        rows = []
        for backend in ("decord", "pyav"):
            for max_side in (384, None):
                r = run_case(path, backend, max_side, args.video_fps, args.repeats)
                rows.append((backend, "384 (reduced)" if max_side else "native", r))
    print(f"\ndecode + preprocess, 1 thread (torch.set_num_threads(1), decoder threads 1), "
          f"sampling {args.video_fps:g} fps; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    print(f"{'backend':<8} {'decode size':<14} {'frames':>6} {'decoded HxW':>12} {'decode s':>9} "
          f"{'prep s':>7} {'decode f/s':>11} {'prep f/s':>9} {'total f/s':>10}")
    for backend, size, r in rows:
        print(f"{backend:<8} {size:<14} {r['frames']:>6} {'x'.join(map(str, r['shape'])):>12} {r['decode']:>9.2f} "
              f"{r['preprocess']:>7.2f} {r['frames'] / r['decode']:>11.1f} {r['frames'] / r['preprocess']:>9.1f} "
              f"{r['frames'] / r['total']:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
