#!/usr/bin/env python
"""Write a long synthetic H.264 video with PyAV (720p, 30 fps by default) for decode benchmarks.

    python scripts/bench/make_long_video.py OUT.mp4 [--minutes 60] [--preset superfast] [--workers 16]

Content: two scenes a minute, each a smooth random image panning one pixel a frame with a bright square
crossing it, looping every 256 frames (each scene's 256 frames are made once, as yuv420p planes, and
fed to the encoder again on every loop, so that the encoder, not Python, sets the pace); libx264 with
its default keyframe interval (250) and B-frames (preset `superfast`: CABAC, 3 B-frames), crf 23.
`--workers N` encodes N segments in parallel processes (each starting on a scene boundary with a
keyframe) and joins them without re-encoding: on the H200 machine's 16 cores the hour took 84 s with
16 workers against 290 s with one encoder. Prints the frames written per second of wall time at the end.
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


def write_segment(path: str, first: int, count: int, fps: int, height: int, width: int, preset: str, seed: int,
                  threads: int = 0) -> int:
    """Frames [first, first + count) of the video (first a scene boundary) into their own H.264 file,
    pts from 0; scene k's image comes from the seed and k alone, so segments can be written apart."""
    import av

    per_scene = 30 * fps
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": preset, **({"threads": str(threads)} if threads else {})}
        loop: list = []
        for t in range(first, first + count):
            if t % per_scene == 0 or not loop:
                planes = scene_planes(np.random.default_rng((seed, t // per_scene)), height, width)
                loop = [av.VideoFrame.from_ndarray(frame_yuv(planes, k, height, width), format="yuv420p")
                        for k in range(min(PAN, first + count - t))]
            frame = loop[(t % per_scene) % len(loop)]
            frame.pts = t - first
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return count


def concatenate(parts: list[str], counts: list[int], path: str, fps: int) -> None:
    """Stream-copy the segment files one after the other into `path` (timestamps shifted per segment)."""
    import av

    with av.open(path, "w") as out:
        ostream, header, offset = None, None, 0
        for part, count in zip(parts, counts):
            with av.open(part) as inp:
                istream = inp.streams.video[0]
                if ostream is None:
                    ostream, header = out.add_stream_from_template(istream), istream.codec_context.extradata
                elif istream.codec_context.extradata != header:  # the joined file keeps the first one's SPS/PPS
                    raise RuntimeError(f"{part}: its codec header differs from the first segment's; cannot join")
                ticks = round(1 / (fps * istream.time_base))  # stream ticks per frame
                for packet in inp.demux(istream):
                    if packet.dts is None:  # the demuxer's end-of-stream packet
                        continue
                    packet.pts, packet.dts = packet.pts + offset, packet.dts + offset
                    packet.stream = ostream
                    out.mux(packet)
                offset += count * ticks


def write(path: str, minutes: float, fps: int = 30, height: int = 720, width: int = 1280,
          preset: str = "superfast", seed: int = 0, workers: int = 1) -> int:
    """The whole video; with workers > 1, in that many segments encoded in parallel processes (cut at
    scene boundaries, each opening with a keyframe) and then concatenated without re-encoding."""
    import os
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    n = int(round(minutes * 60 * fps))
    per_scene = 30 * fps
    scenes = -(-n // per_scene)
    workers = max(1, min(workers, scenes))
    if workers == 1:
        return write_segment(path, 0, n, fps, height, width, preset, seed)
    cuts = [min(n, per_scene * round(scenes * w / workers)) for w in range(workers + 1)]
    counts = [b - a for a, b in zip(cuts, cuts[1:])]
    threads = max(1, (os.cpu_count() or 1) // workers)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
        parts = [os.path.join(tmp, f"part{w:03d}.mp4") for w in range(workers)]
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(write_segment, parts, cuts[:-1], counts, *([v] * workers for v in
                                                                    (fps, height, width, preset, seed, threads))))
        concatenate(parts, counts, path, fps)
    return n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--preset", default="superfast")
    parser.add_argument("--workers", type=int, default=1, help="encode this many segments in parallel processes")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    n = write(args.out, args.minutes, args.fps, preset=args.preset, workers=args.workers)
    seconds = time.perf_counter() - start
    print(f"wrote {args.out}: {n} frames 1280x720 at {args.fps} fps in {seconds:.1f} s ({n / seconds:.0f} frames/s)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
