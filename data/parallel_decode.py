"""Parallel decoding of a long video's sampled frames: the sampled indices are split into contiguous
segments, and each worker opens the file, seeks to the keyframe before its segment and decodes only
through the segment's last sampled frame, converting only the sampled frames (RGB, reduced size).

Workers are processes (``executor="process"``: no shared interpreter lock; fresh interpreters, not
forks, writing into one shared buffer) or threads. The frames,
indices and sizes equal `data.video.decode_video` with the PyAV backend. Only container videos
(not GIFs, frame folders or .npy arrays): those go through `decode_video`.

`start_decode` returns at once with `DecodingFrames`, which the model takes as its uint8 frames: the
vision pipeline reads them chunk by chunk and waits only for the segments it reads, so the towers
work on the first segments while later ones are still decoding.
"""

from __future__ import annotations

import bisect
import json
import mmap
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Callable

import numpy as np
import torch

from data.errors import MediaError
from data.pyav_decode import decode_segment
from data.video import DecodedFrames, SamplingConfig, probe_video, reduced_size, sampled_or_raise
from longvu.processing import FrameSize

EXECUTORS = ("process", "thread")


def split_segments(idx: np.ndarray, workers: int) -> list[np.ndarray]:
    """Contiguous, non-empty runs of `idx` of near-equal length, at most `workers` of them."""
    return [part for part in np.array_split(idx, max(1, min(workers, len(idx)))) if len(part)]


class DecodingFrames:
    """uint8 frames [T, h, w, 3] that decoders are still writing, one future per segment of rows
    (`starts[k]` its first row). Indexing (a slice or an index tensor of rows) waits for the segments
    it touches; `shape`, `dtype` and `device` are the finished tensor's. `on_segment(frames done,
    frames in all)` hears of each finished segment. `wait()` -> the whole tensor;
    `seconds`: wall time from the start to the last segment (None before). A failed segment raises
    its MediaError where it is read. A future's result is its rows, copied in, or None when the
    decoder wrote them into `tensor` (given) itself."""

    def __init__(self, path: str, shape: tuple[int, ...], starts: list[int], futures: list[Future],
                 on_segment: Callable[[int, int], None] | None = None, tensor: torch.Tensor | None = None):
        self.tensor = torch.empty(shape, dtype=torch.uint8) if tensor is None else tensor
        self.path, self.starts = path, starts
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
            if part is not None:
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


class DecoderProcesses:
    """`workers` fresh `python -m data.pyav_decode` processes (see that module) that decode segments
    of `path` straight into one shared buffer, `tensor` uint8 [rows, small.height, small.width, 3]
    (an anonymous memory file; nothing to clean up). `futures[k]` ends with None once segment k's
    rows are written, or with its MediaError. A decoder that dies or answers out of protocol fails its
    segment and every segment still queued for any decoder (a crash is not retried)."""

    def __init__(self, path: str, fps: float, small: FrameSize, segments: list[np.ndarray], starts: list[int],
                 workers: int):
        rows = sum(len(seg) for seg in segments)
        size = rows * small.height * small.width * 3
        try:
            memory_file, fd = None, os.memfd_create("longvu-frames")
        except (AttributeError, OSError):  # no memfd here: an unlinked temporary file, as anonymous
            memory_file = tempfile.TemporaryFile()
            fd = memory_file.fileno()
        try:
            os.ftruncate(fd, size)
            self._buffer = mmap.mmap(fd, size)  # holds its own descriptor
            self.tensor = torch.frombuffer(self._buffer, dtype=torch.uint8).view(rows, small.height, small.width, 3)
            self.path, self.futures = path, [Future() for _ in segments]
            self._jobs = deque(zip(self.futures, starts, segments))
            self._lock = threading.Lock()
            header = json.dumps({"path": os.path.abspath(path), "fps": fps, "height": small.height,
                                 "width": small.width, "rows": rows}) + "\n"
            # started in the project root (and with it on the path), so `-m` finds this `data` package first
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
            procs = []
            try:
                for _ in range(min(workers, len(segments))):
                    procs.append(subprocess.Popen([sys.executable, "-m", "data.pyav_decode", str(fd)],
                                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(fd,),
                                                  env=env, cwd=root, text=True))
            except OSError:
                for proc in procs:
                    proc.kill()
                raise
            for proc in procs:
                threading.Thread(target=self._feed, args=(proc, header), daemon=True).start()
        finally:
            if memory_file is None:
                os.close(fd)
            else:
                memory_file.close()

    def _next(self):
        with self._lock:
            return self._jobs.popleft() if self._jobs else None

    def _feed(self, proc: subprocess.Popen, header: str) -> None:
        """One decoder's segments, taken from the shared queue in order until it is empty."""
        job = None
        try:
            proc.stdin.write(header)
            while (job := self._next()) is not None:
                fut, row, idx = job
                fut.set_running_or_notify_cancel()
                proc.stdin.write(json.dumps({"row": row, "indices": idx.tolist()}) + "\n")
                proc.stdin.flush()
                reply = proc.stdout.readline()
                if not reply:
                    raise OSError("no answer")
                answer = json.loads(reply)
                if not isinstance(answer, dict) or answer.get("row") != row:
                    raise ValueError(f"unexpected answer {reply.strip()[:200]!r} for the segment at row {row}")
                if "reason" in answer:
                    fut.set_exception(MediaError(self.path, str(answer["reason"]), str(answer.get("code"))))
                else:
                    fut.set_result(None)
            proc.stdin.close()
            proc.wait()
        except Exception as err:  # the decoder died or garbled its answer: fail its segment and the queue
            proc.kill()
            failure = MediaError(self.path, f"decoder process failed (exit code {proc.wait()}; its messages are "
                                            f"on this process's stderr): {err}",
                                 "undecodable_video")
            job = job or self._next()  # it may die before taking one: the queue still ends
            while job is not None:
                job[0].set_exception(failure)
                job = self._next()


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
    starts = np.cumsum([0] + [len(seg) for seg in segments[:-1]]).tolist()
    shape = (len(idx), small.height, small.width, 3)
    if executor == "process":
        procs = DecoderProcesses(path, meta.fps, small, segments, starts, workers)
        frames = DecodingFrames(path, shape, starts, procs.futures, on_segment, tensor=procs.tensor)
    else:
        pool = ThreadPoolExecutor(min(workers, len(segments)))
        futures = [pool.submit(decode_segment, path, seg, meta.fps, small) for seg in segments]
        pool.shutdown(wait=False)  # the submitted segments still run; the workers exit after them
        frames = DecodingFrames(path, shape, starts, futures, on_segment)
    return frames, DecodedFrames(None, idx, meta.size, meta.fps, meta.n_frames)


def decode_video_parallel(path: str, cfg: SamplingConfig, workers: int | None = None, executor: str = "process",
                          start: float | None = None, end: float | None = None,
                          on_segment: Callable[[int, int], None] | None = None) -> DecodedFrames:
    """`decode_video(path, cfg, start, end)` for a video file, with `workers` (default: CPU count)
    PyAV decoders over segments (`start_decode`, waited for). Raises MediaError."""
    frames, decoded = start_decode(path, cfg, workers, executor, start, end, on_segment)
    decoded.frames = frames.wait().numpy()
    return decoded
