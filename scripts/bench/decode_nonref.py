#!/usr/bin/env python
"""PyAV decode of a 1-fps sample with and without skipping unsampled non-reference frames
(`data.pyav_decode.pyav_sampled_frames(skip_nonref=...)`), one decoder thread, in one process.

    python scripts/bench/decode_nonref.py [--video FILE.mp4 | --minutes 2] [--video-fps 1] [--repeats 3]

Without `--video` it writes a 720p 30-fps H.264 clip with scripts/bench/make_long_video.py (x264
superfast: B-frames, as most published video has). The two settings alternate, `--repeats` times
each; the table gives the median seconds, source frames/s and whether the sampled frames are equal.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from data.pyav_decode import pyav_sampled_frames  # noqa: E402
from data.video import SamplingConfig, probe_video, reduced_size, sample_indices  # noqa: E402


def decode(path: str, idx: np.ndarray, fps: float, small, skip: bool) -> tuple[np.ndarray, float]:
    import av

    start = time.perf_counter()
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        frames = pyav_sampled_frames(path, container, stream, idx, fps, small, skip_nonref=skip)
    return frames, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--video")
    parser.add_argument("--minutes", type=float, default=2)
    parser.add_argument("--video-fps", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.video
        if path is None:
            from make_long_video import write

            path = os.path.join(tmp, "clip.mp4")
            write(path, args.minutes, workers=os.cpu_count() or 1)
        return report(path, args)


def report(path: str, args) -> int:
    """Time both settings on `path` and print the table -> 0 if the sampled frames are equal."""
    cfg = SamplingConfig(video_fps=args.video_fps, max_frames=None, backend="pyav", fallback=False)
    meta = probe_video(path, cfg)
    idx = sample_indices(meta.n_frames, meta.fps, args.video_fps, None, None, None)
    small = reduced_size(meta.size, cfg.max_side)
    seconds, outputs = {True: [], False: []}, {}
    for _ in range(args.repeats):
        for skip in (False, True):
            outputs[skip], s = decode(path, idx, meta.fps, small, skip)
            seconds[skip].append(s)
    source = int(idx[-1]) + 1
    print(f"{path}: {meta.n_frames} frames at {meta.fps:g} fps, {len(idx)} sampled at {args.video_fps:g} fps, "
          f"one decoder thread, {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| non-reference frames | s (median) | source frames/s |")
    print("|---|---|---|")
    for skip in (False, True):
        s = statistics.median(seconds[skip])
        print(f"| {'skipped when unsampled' if skip else 'all decoded'} | {s:.2f} | {source / s:.0f} |")
    same = np.array_equal(outputs[True], outputs[False])
    print(f"speed-up {statistics.median(seconds[False]) / statistics.median(seconds[True]):.2f}x; "
          f"sampled frames equal: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
