#!/usr/bin/env python
"""Write a long synthetic H.264 video with PyAV (720p, 30 fps by default) for decode benchmarks.

    python scripts/bench/make_long_video.py OUT.mp4 [--minutes 60] [--preset superfast]

Content: two scenes a minute, each a smooth random image panning one pixel a frame with a bright square
crossing it, looping every 256 frames (each scene's 256 frames are made once, as yuv420p planes, and
fed to the encoder again on every loop, so that the encoder, not Python, sets the pace); libx264 with
its default keyframe interval (250) and B-frames (preset `superfast`: CABAC, 3 B-frames), crf 23.
Prints the frames written per second of wall time at the end.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from PIL import Image

PAN = 256


def smooth_plane(rng, height: int, width: int, lo: int, hi: int) -> np.ndarray:
    """uint8 [height, width]: bicubic upsampling of a coarse random grid, values in [lo, hi]."""
    coarse = rng.integers(lo, hi + 1, (6, 12), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def scene_planes(rng, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y [h, w + PAN], U and V [h/2, (w + PAN)/2] of one scene."""
    wide = width + PAN
    return (smooth_plane(rng, height, wide, 16, 235), smooth_plane(rng, height // 2, wide // 2, 88, 168),
            smooth_plane(rng, height // 2, wide // 2, 88, 168))


def frame_yuv(planes, t: int, height: int, width: int) -> np.ndarray:
    """Frame t of a scene as a packed yuv420p array [h * 3 / 2, w]."""
    y, u, v = planes
    off = t % PAN
    out = np.empty((height * 3 // 2, width), dtype=np.uint8)
    out[:height] = y[:, off:off + width]
    side = 80
    x0 = (t * 7) % (width - side)
    out[height // 3:height // 3 + side, x0:x0 + side] = 235
    q = height // 4
    out[height:height + q] = np.ascontiguousarray(u[:, off // 2:off // 2 + width // 2]).reshape(q, width)
    out[height + q:] = np.ascontiguousarray(v[:, off // 2:off // 2 + width // 2]).reshape(q, width)
    return out


def write(path: str, minutes: float, fps: int = 30, height: int = 720, width: int = 1280,
          preset: str = "superfast", seed: int = 0) -> int:
    import av

    rng = np.random.default_rng(seed)
    n = int(round(minutes * 60 * fps))
    per_scene = 30 * fps
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": preset}
        loop: list = []
        for t in range(n):
            if t % per_scene == 0:
                planes = scene_planes(rng, height, width)
                loop = [av.VideoFrame.from_ndarray(frame_yuv(planes, k, height, width), format="yuv420p")
                        for k in range(min(PAN, n - t))]
            frame = loop[(t % per_scene) % len(loop)]
            frame.pts = t
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--preset", default="superfast")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    n = write(args.out, args.minutes, args.fps, preset=args.preset)
    seconds = time.perf_counter() - start
    print(f"wrote {args.out}: {n} frames 1280x720 at {args.fps} fps in {seconds:.1f} s ({n / seconds:.0f} frames/s)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
