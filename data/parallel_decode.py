"""Parallel decoding of a long video's sampled frames: the sampled indices are split into contiguous
segments, and each worker opens the file, seeks to the keyframe before its segment and decodes only
through the segment's last sampled frame, converting only the sampled frames (RGB, reduced size).

Workers are processes (``executor="process"``: no shared interpreter lock) or threads. The frames,
indices and sizes equal `data.video.decode_video` with the PyAV backend. Only container videos
(not GIFs, frame folders or .npy arrays): those go through `decode_video`.

`start_decode` returns at once with `DecodingFrames`, which the model takes as its uint8 frames: the
vision pipeline reads them chunk by chunk and waits only for the segments it reads, so the towers
work on the first segments while later ones are still decoding.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from typing import Callable

import numpy as np
import torch

from data.errors import MediaError
from data.video import (DecodedFrames, SamplingConfig, _open_failure, probe_video, pyav_sampled_frames,
                        reduced_size, sampled_or_raise)
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


class DecodingFrames:
    """uint8 frames [T, h, w, 3] that decoders are still writing, one future per segment of rows
    (`starts[k]` its first row). Indexing (a slice or an index tensor of rows) waits for the segments
    it touches; `shape`, `dtype` and `device` are the finished tensor's. `on_segment(frames done,
    frames in all)` hears of each finished segment. `wait()` -> the whole tensor;
    `seconds`: wall time from the start to the last segment (None before). A failed segment raises
    its MediaError where it is read."""

    def __init__(self, path: str, shape: tuple[int, ...], starts: list[int], futures: list[Future],
                 on_segment: Callable[[int, int], None] | None = None):
        self.path, self.tensor, self.starts = path, torch.empty(shape, dtype=torch.uint8), starts
        self.seconds: float | None = None
        self._start = time.perf_counter()
        self._ready = [threading.Event() for _ in futures]
        self._errors: list[Exception | None] = [None] * len(futures)
        self._lock, self._done, self._rows, self._on_segment = threading.Lock(), 0, 0, on_segment
        for k, fut in enumerate(futures):
            fut.add_done_callback(partial(self._store, k))

    shape = property(lambda self: self.tensor.shape)
    dtype = property(lambda self: self.tensor.dtype)
    device = property(lambda self: self.tensor.device)

    def _store(self, k: int, fut: Future) -> None:
        try:
            part = fut.result()
            self.tensor[self.starts[k]:self.starts[k] + len(part)] = torch.from_numpy(part)
        except Exception as err:  # kept for the reader of these rows (a MediaError, or why the worker died)
            self._errors[k] = err
        end = self.starts[k + 1] if k + 1 < len(self.starts) else self.tensor.shape[0]
        with self._lock:
            self._done += 1
            self._rows += end - self.starts[k]
            if self._done == len(self._ready):
                self.seconds = time.perf_counter() - self._start
            self._ready[k].set()
            if self._on_segment is not None:
                self._on_segment(self._rows, self.tensor.shape[0])

    def _wait(self, first: int, last: int) -> None:
        for k in range(bisect.bisect_right(self.starts, first) - 1, bisect.bisect_right(self.starts, last)):
            self._ready[k].wait()
            err = self._errors[k]
            if err is not None:
                raise err if isinstance(err, MediaError) else MediaError(self.path, f"decoder failed: {err}",
                                                                         "undecodable_video")

    def __getitem__(self, index: slice | torch.Tensor) -> torch.Tensor:
        if isinstance(index, slice):
            first, stop, _ = index.indices(self.tensor.shape[0])
            last = stop - 1
        else:
            first, last = int(index.min()), int(index.max())
        if last >= first:
            self._wait(first, last)
        return self.tensor[index]

    def wait(self) -> torch.Tensor:
        self._wait(0, self.tensor.shape[0] - 1)
        return self.tensor


def start_decode(path: str, cfg: SamplingConfig, workers: int | None = None, executor: str = "process",
                 start: float | None = None, end: float | None = None,
                 on_segment: Callable[[int, int], None] | None = None,
                 segments_per_worker: int = 1) -> tuple[DecodingFrames, DecodedFrames]:
    """Start decoding the sampled frames of a video file with `workers` (default: CPU count) PyAV
    decoders over `segments_per_worker * workers` segments, taken in order -> (the frames as they
    arrive, their DecodedFrames facts with `frames` None). More segments per worker let a reader
    start sooner (the first ones finish early) at the cost of one keyframe seek each.
    `on_segment(frames done, frames in all)` is called as segments finish. Raises MediaError (file, range)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    meta = probe_video(path, cfg)
    idx = sampled_or_raise(path, meta.n_frames, meta.fps, cfg, start, end)
    workers = workers or os.cpu_count() or 1
    segments = split_segments(idx, workers * max(1, segments_per_worker))
    small = reduced_size(meta.size, cfg.max_side)
    pool_class = ProcessPoolExecutor if executor == "process" else ThreadPoolExecutor
    pool: Executor = pool_class(min(workers, len(segments)))
    futures = [pool.submit(_decode_segment, path, seg, meta.fps, small) for seg in segments]
    pool.shutdown(wait=False)  # the submitted segments still run; the workers exit after them
    starts = np.cumsum([0] + [len(seg) for seg in segments[:-1]]).tolist()
    frames = DecodingFrames(path, (len(idx), small.height, small.width, 3), starts, futures, on_segment)
    return frames, DecodedFrames(None, idx, meta.size, meta.fps, meta.n_frames)


def decode_video_parallel(path: str, cfg: SamplingConfig, workers: int | None = None, executor: str = "process",
                          start: float | None = None, end: float | None = None,
                          on_segment: Callable[[int, int], None] | None = None) -> DecodedFrames:
    """`decode_video(path, cfg, start, end)` for a video file, with `workers` (default: CPU count)
    PyAV decoders over segments (`start_decode`, waited for). Raises MediaError."""
    frames, decoded = start_decode(path, cfg, workers, executor, start, end, on_segment)
    decoded.frames = frames.wait().numpy()
    return decoded
