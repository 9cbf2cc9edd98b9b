"""Load one media item of a record (image, video, GIF or frame folder) with a decode timeout."""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable, TypeVar

import numpy as np

from data.errors import MediaError
from data.manifest import MediaRef, missing_reason, resolve
from data.video import DecodedFrames, SamplingConfig, decode_video, load_image_array
from longvu.processing import FrameSize

T = TypeVar("T")


class _Worker:
    """A daemon thread that runs one call at a time for the current thread of the current process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="media-io", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, box, done = self.jobs.get()
            try:
                box["value"] = fn()
            except BaseException as e:  # re-raised in the caller's thread
                box["error"] = e
            done.set()


_LOCAL = threading.local()


def run_with_timeout(fn: Callable[[], T], timeout_s: float | None, path: str) -> T:
    """Run ``fn`` on this thread's media worker and wait at most ``timeout_s`` seconds.

    A call that hangs inside native code (a FIFO, a dead mount) cannot be interrupted: its worker is
    abandoned (a daemon thread, it ends with the process), the next call gets a new one, and
    MediaError(path, ..., "decode_timeout") is raised. A forked process (loader worker) starts its own.
    """
    if not timeout_s:
        return fn()
    worker = getattr(_LOCAL, "worker", None)
    if worker is None or worker.pid != os.getpid():
        worker = _LOCAL.worker = _Worker()
    box: dict = {}
    done = threading.Event()
    worker.jobs.put((fn, box, done))
    if not done.wait(timeout_s):
        _LOCAL.worker = None
        raise MediaError(path, f"decoding took longer than {timeout_s:g} s (timeout)", "decode_timeout")
    if "error" in box:
        raise box["error"]
    return box["value"]


def require_media(ref: MediaRef, media_root: str | None) -> str:
    """The resolved path of ``ref``; MediaError naming the path and the root when it does not exist."""
    path = resolve(ref.path, media_root)
    if not os.path.exists(path):
        raise MediaError(path, missing_reason(ref.path, media_root), "missing_file")
    return path


def load_media(ref: MediaRef, media_root: str | None, cfg: SamplingConfig,
               timeout_s: float | None = None) -> DecodedFrames:
    """Decode a media item: images as one frame ``[1, H, W, 3]``, videos sampled per ``cfg``.

    The whole access (existence check included: a dead mount hangs in ``stat``) runs under the timeout.
    """
    path = resolve(ref.path, media_root)

    def work() -> DecodedFrames:
        require_media(ref, media_root)
        if ref.kind == "image":
            arr = load_image_array(path)
            return DecodedFrames(arr[None], np.zeros(1, np.int64), FrameSize(*arr.shape[:2]), 0.0, 1)
        return decode_video(path, cfg, ref.start, ref.end, ref.fps)

    return run_with_timeout(work, timeout_s, path)
