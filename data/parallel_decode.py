"""Parallel decoding of a long video's sampled frames: the sampled indices are split into contiguous
segments, and each worker opens the file, seeks to the keyframe before its segment and decodes only
through the segment's last sampled frame, converting only the sampled frames (RGB, reduced size).

Workers are processes (``executor="process"``: no shared interpreter lock) or threads. The frames,
indices and sizes equal `data.video.decode_video` with the PyAV backend. Only container videos
(not GIFs, frame folders or .npy arrays): those go through `decode_video`.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Callable

import numpy as np

from data.errors import MediaError
from data.video import (DecodedFrames, SamplingConfig, _empty_range, _open_failure, probe_video,
                        pyav_sampled_frames, reduced_size, sample_indices)
from longvu.processing import FrameSize

EXECUTORS = ("process", "thread")


def _decode_segment(path: str, idx: np.ndarray, fps: float, small: FrameSize) -> np.ndarray:
    """One worker: frames `idx` of `path` -> uint8 [len(idx), h, w, 3] (decoder single-threaded)."""
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise _open_failure(path, "PyAV", e) from e
    with container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        return pyav_sampled_frames(path, container, stream, idx, fps, small)


def split_segments(idx: np.ndarray, workers: int) -> list[np.ndarray]:
    """Contiguous, non-empty runs of `idx` of near-equal length, at most `workers` of them."""
    return [part for part in np.array_split(idx, max(1, min(workers, len(idx)))) if len(part)]


def decode_video_parallel(path: str, cfg: SamplingConfig, workers: int | None = None, executor: str = "process",
                          start: float | None = None, end: float | None = None,
                          on_segment: Callable[[int, int], None] | None = None) -> DecodedFrames:
    """`decode_video(path, cfg, start, end)` for a video file, with `workers` (default: CPU count)
    PyAV decoders over segments. `on_segment(done, total)` is called as segments finish. Raises MediaError."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    meta = probe_video(path, cfg)
    idx = sample_indices(meta.n_frames, meta.fps, cfg.video_fps, start, end, cfg.max_frames)
    if len(idx) == 0:
        raise _empty_range(path, meta.n_frames, meta.fps, start, end)
    segments = split_segments(idx, workers or os.cpu_count() or 1)
    small = reduced_size(meta.size, cfg.max_side)
    pool: Executor = (ProcessPoolExecutor if executor == "process" else ThreadPoolExecutor)(len(segments))
    with pool:
        futures = [pool.submit(_decode_segment, path, seg, meta.fps, small) for seg in segments]
        parts = []
        for k, fut in enumerate(futures):
            parts.append(fut.result())
            if on_segment is not None:
                on_segment(k + 1, len(futures))
    frames = np.concatenate(parts)
    if frames.shape[0] != len(idx):
        raise MediaError(path, f"decoded {frames.shape[0]} of {len(idx)} sampled frames", "undecodable_video")
    return DecodedFrames(frames, idx, meta.size, meta.fps, meta.n_frames)
