"""Load one media item of a record (image, video, GIF or frame folder) with a decode timeout."""

from __future__ import annotations

import os
import threading
from typing import Callable, TypeVar

import numpy as np

from data.errors import MediaError
from data.manifest import MediaRef, resolve
from data.video import DecodedFrames, SamplingConfig, decode_video, load_image_array
from longvu.processing import FrameSize

T = TypeVar("T")


def run_with_timeout(fn: Callable[[], T], timeout_s: float | None, path: str) -> T:
    """Run ``fn`` in a daemon thread and wait at most ``timeout_s`` seconds.

    A decode that hangs inside native code cannot be interrupted; the thread is abandoned (it
    ends with the process) and MediaError(path, ..., "decode_timeout") is raised.
    """
    if not timeout_s:
        return fn()
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread below
            box["error"] = e

    thread = threading.Thread(target=target, name=f"decode:{os.path.basename(path)}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise MediaError(path, f"decoding took longer than {timeout_s:g} s (timeout)", "decode_timeout")
    if "error" in box:
        raise box["error"]
    return box["value"]


def load_media(ref: MediaRef, media_root: str | None, cfg: SamplingConfig,
               timeout_s: float | None = None) -> DecodedFrames:
    """Decode a media item: images as one frame ``[1, H, W, 3]``, videos sampled per ``cfg``."""
    path = resolve(ref.path, media_root)
    if ref.kind == "image":
        def work() -> DecodedFrames:
            arr = load_image_array(path)
            return DecodedFrames(arr[None], np.zeros(1, np.int64), FrameSize(*arr.shape[:2]), 0.0, 1)
    else:
        def work() -> DecodedFrames:
            return decode_video(path, cfg, ref.start, ref.end, ref.fps)
    return run_with_timeout(work, timeout_s, path)
