"""Video, GIF and frame-folder decoding with LongVU's frame sampling.

Sampling (the reference's rule, plus the bounds and cap it lacks): frames ``first, first+s,
first+2s, ... < stop`` with stride ``s = max(1, round(native_fps / video_fps))``, where ``first =
round(start * native_fps)`` (0 without ``start``) and ``stop = min(n_frames, round(end *
native_fps))`` (``n_frames`` without ``end``), i.e. the time range ``[start, end)``. More than
``max_frames`` frames are subsampled uniformly (``linspace`` over the sampled positions), or with
``cap="stride"`` every ``len // max_frames``-th is kept (the original evaluation scripts' rule:
between ``max_frames`` and ``2 * max_frames - 1`` frames remain).

GIFs are sampled by time from their own frame durations (``gif_fps`` overrides them); frame
folders (images sorted by natural name order) are treated as a clip at ``folder_fps``. ``.npy``
frame arrays (uint8 ``[T, H, W, 3]``, as LongVU's loader reads them; about 4% of its video json)
carry no frame rate: they are treated as a clip at ``npy_fps`` (default 1, i.e. every frame at
``video_fps`` 1, which is what LongVU does: it keeps all frames of an array).

Only the sampled frames are converted to RGB. Videos are decoded at a reduced size whose long side
is ``max_side`` (the towers need no more than 384 px); the reported ``size`` is always the
original (height, width). Every failure raises MediaError(path, reason) with a problem code.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from data.errors import MediaError, open_failure
from data.pyav_decode import pyav_sampled_frames
from longvu.processing import FrameSize

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
BACKENDS = ("decord", "pyav")


@dataclass
class SamplingConfig:
    """How frames are chosen and decoded."""

    video_fps: float = 1.0
    max_frames: int | None = 1000
    backend: str = "decord"  # "decord" or "pyav"
    fallback: bool = True  # try the other backend when the first one fails
    max_side: int | None = 384  # decode videos with this long side at most; None: native size
    gif_fps: float | None = None  # None: the GIF's own frame durations
    folder_fps: float = 1.0  # assumed frame rate of a frame folder
    npy_fps: float = 1.0  # assumed frame rate of a .npy frame array (LongVU keeps all its frames)
    decode_threads: int = 1
    cap: str = "uniform"  # how max_frames is enforced: "uniform" (linspace) or "stride" (every k-th)

    def __post_init__(self) -> None:
        if not self.video_fps > 0:
            raise ValueError(f"video_fps must be positive, got {self.video_fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {self.max_frames}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.folder_fps <= 0 or self.npy_fps <= 0 or (self.gif_fps is not None and self.gif_fps <= 0):
            raise ValueError("folder_fps, npy_fps and gif_fps must be positive")
        if self.cap not in ("uniform", "stride"):
            raise ValueError(f"cap must be 'uniform' or 'stride', got {self.cap!r}")


@dataclass
class DecodedFrames:
    """Sampled frames of one media item.

    frames: uint8 ``[T, h, w, 3]`` (possibly reduced size); indices: ``[T]`` source frame indices;
    size: the original FrameSize; native_fps and n_total describe the source.
    """

    frames: np.ndarray
    indices: np.ndarray
    size: FrameSize
    native_fps: float
    n_total: int


@dataclass
class VideoMeta:
    """Header facts of a video-like source, read without decoding pixels."""

    n_frames: int
    fps: float
    size: FrameSize


def sample_indices(n_frames: int, native_fps: float, video_fps: float, start: float | None = None,
                   end: float | None = None, max_frames: int | None = None, cap: str = "uniform") -> np.ndarray:
    """Indices of the frames to decode (see the module docstring); int64 ``[T]``, possibly empty."""
    stride = max(1, round(native_fps / video_fps))
    first = round(start * native_fps) if start is not None else 0
    stop = min(n_frames, round(end * native_fps)) if end is not None else n_frames
    idx = np.arange(first, stop, stride, dtype=np.int64)
    if max_frames is not None and len(idx) > max_frames:
        if cap == "stride":
            return idx[:: len(idx) // max_frames]
        idx = idx[np.linspace(0, len(idx) - 1, max_frames).round().astype(np.int64)]
    return idx


def sample_by_time(times: np.ndarray, duration: float, video_fps: float, start: float | None,
                   end: float | None, max_frames: int | None) -> np.ndarray:
    """Frames shown at ``start, start + 1/video_fps, ...`` within ``[start, end)``.

    times: float ``[N]`` start time of each frame (ascending). Returns int64 indices ``[T]``.
    """
    t0 = start or 0.0
    t1 = min(duration, end) if end is not None else duration
    targets = np.arange(t0, t1 - 1e-9, 1.0 / video_fps)
    idx = np.searchsorted(times, targets + 1e-9, side="right") - 1
    idx = idx[idx >= 0]
    if max_frames is not None and len(idx) > max_frames:
        idx = idx[np.linspace(0, len(idx) - 1, max_frames).round().astype(np.int64)]
    return idx.astype(np.int64)


def reduced_size(size: FrameSize, max_side: int | None) -> FrameSize:
    """Decode size with the long side at most ``max_side``, keeping the aspect ratio."""
    if max_side is None or max(size) <= max_side:
        return size
    scale = max_side / max(size)
    return FrameSize(max(1, round(size.height * scale)), max(1, round(size.width * scale)))


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise MediaError(path, "file does not exist", "missing_file")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise MediaError(path, "file is empty (0 bytes)", "empty_file")


def _empty_range(path: str, n: int, fps: float, start, end) -> MediaError:
    return MediaError(path, f"no frame in range start={start} end={end} (clip has {n} frames at {fps:.3f} fps)",
                      "empty_range")


def sampled_or_raise(path: str, n: int, fps: float, cfg: SamplingConfig, start, end) -> np.ndarray:
    """`sample_indices` of a clip of `n` frames at `fps` under `cfg`; MediaError (empty_range) if none."""
    idx = sample_indices(n, fps, cfg.video_fps, start, end, cfg.max_frames, cfg.cap)
    if len(idx) == 0:
        raise _empty_range(path, n, fps, start, end)
    return idx


# ------------------------------------------------------------------------------------------
# decord
# ------------------------------------------------------------------------------------------


def _decode_decord(path: str, cfg: SamplingConfig, start, end) -> DecodedFrames:
    import decord

    size = _header_size(path)
    small = reduced_size(size, cfg.max_side) if size else FrameSize(-1, -1)
    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=cfg.decode_threads,
                                width=small.width, height=small.height)
        n, fps = len(vr), float(vr.get_avg_fps())
    except (RuntimeError, decord.DECORDError) as e:
        raise open_failure(path, "decord", e) from e
    if n == 0 or fps <= 0:
        raise MediaError(path, f"decord reports {n} frames at {fps} fps", "no_frames")
    idx = sampled_or_raise(path, n, fps, cfg, start, end)
    try:
        frames = vr.get_batch(idx.tolist()).asnumpy()
    except (RuntimeError, decord.DECORDError) as e:
        raise MediaError(path, f"decord failed to decode frames {idx[:3].tolist()}...: {e}",
                         "undecodable_video") from e
    if size is None:
        size = FrameSize(*frames.shape[1:3])
    return DecodedFrames(frames, idx, size, fps, n)


def _header_size(path: str) -> FrameSize | None:
    """(height, width) from the container header via PyAV, or None if PyAV cannot read it."""
    import av

    try:
        with av.open(path) as container:
            if container.streams.video:
                cc = container.streams.video[0].codec_context
                if cc.height and cc.width:
                    return FrameSize(cc.height, cc.width)
    except (av.error.FFmpegError, OSError):
        return None
    return None


# ------------------------------------------------------------------------------------------
# PyAV
# ------------------------------------------------------------------------------------------


def _pyav_meta(stream, container) -> tuple[int, float]:
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    n = stream.frames
    if not n and fps:
        duration = (float(stream.duration * stream.time_base) if stream.duration
                    else (container.duration or 0) / 1e6)
        n = int(round(duration * fps))
    return int(n), fps


def _decode_pyav(path: str, cfg: SamplingConfig, start, end) -> DecodedFrames:
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise open_failure(path, "PyAV", e) from e
    with container:
        if not container.streams.video:
            raise MediaError(path, "file has no video stream", "not_a_video")
        stream = container.streams.video[0]
        stream.thread_count = cfg.decode_threads
        n, fps = _pyav_meta(stream, container)
        if n == 0 or fps <= 0:
            raise MediaError(path, f"PyAV reports {n} frames at {fps} fps", "no_frames")
        size = FrameSize(stream.codec_context.height, stream.codec_context.width)
        idx = sampled_or_raise(path, n, fps, cfg, start, end)
        frames = pyav_sampled_frames(path, container, stream, idx, fps, reduced_size(size, cfg.max_side))
    return DecodedFrames(frames, idx, size, fps, n)


# ------------------------------------------------------------------------------------------
# GIF and frame folders
# ------------------------------------------------------------------------------------------


def _decode_gif(path: str, cfg: SamplingConfig, start, end, fps: float | None) -> DecodedFrames:
    try:
        with Image.open(path) as im:
            durations = []
            for frame in ImageSequence.Iterator(im):
                durations.append(frame.info.get("duration", 0) / 1000.0)
            n = len(durations)
            rate = fps or cfg.gif_fps
            if rate is None:
                dur = np.asarray(durations, dtype=np.float64)
                dur[dur <= 0] = 0.1  # browsers show 0-duration GIF frames for about 0.1 s
            else:
                dur = np.full(n, 1.0 / rate)
            times = np.concatenate([[0.0], np.cumsum(dur)[:-1]])
            idx = sample_by_time(times, float(dur.sum()), cfg.video_fps, start, end, cfg.max_frames)
            if len(idx) == 0:
                raise _empty_range(path, n, n / dur.sum(), start, end)
            frames = []
            for i in idx:
                im.seek(int(i))
                frames.append(np.asarray(im.convert("RGB")))
            size = FrameSize(im.height, im.width)
    except (UnidentifiedImageError, OSError, EOFError) as e:
        raise MediaError(path, f"cannot decode GIF: {e}", "undecodable_video") from e
    return DecodedFrames(np.stack(frames), idx, size, float(n / dur.sum()), n)


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_frame_files(path: str) -> list[str]:
    """Image files of a frame folder in natural order (``2.jpg`` before ``10.jpg``)."""
    names = [n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return [os.path.join(path, n) for n in sorted(names, key=_natural_key)]


def _decode_folder(path: str, cfg: SamplingConfig, start, end, fps: float | None) -> DecodedFrames:
    files = list_frame_files(path)
    if not files:
        raise MediaError(path, "frame folder has no image files", "bad_frame_folder")
    rate = fps or cfg.folder_fps
    idx = sampled_or_raise(path, len(files), rate, cfg, start, end)
    frames = [load_image_array(files[i]) for i in idx]
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise MediaError(path, f"frames have different sizes {sorted(shapes)}", "bad_frame_folder")
    size = FrameSize(*frames[0].shape[:2])
    return DecodedFrames(np.stack(frames), idx, size, rate, len(files))


def _npy_shape(path: str) -> tuple[int, ...]:
    """Shape of a ``.npy`` frame array from its header; MediaError unless uint8 ``[T, H, W, 3]``."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (ValueError, OSError, SyntaxError) as e:
        raise MediaError(path, f"not a .npy array: {e}", "not_a_video") from e
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise MediaError(path, f".npy holds {dtype} {list(shape)}, expected uint8 [T, H, W, 3] frames",
                         "not_a_video")
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise MediaError(path, f".npy frame array has shape {list(shape)}: no frames", "no_frames")
    return shape


def _decode_npy(path: str, cfg: SamplingConfig, start, end, fps: float | None) -> DecodedFrames:
    n, h, w, _ = _npy_shape(path)
    rate = fps or cfg.npy_fps
    idx = sampled_or_raise(path, n, rate, cfg, start, end)
    try:
        frames = np.ascontiguousarray(np.load(path, mmap_mode="r", allow_pickle=False)[idx])
    except (ValueError, OSError) as e:
        raise MediaError(path, f"cannot read the .npy frames (truncated?): {e}", "undecodable_video") from e
    return DecodedFrames(frames, idx, FrameSize(h, w), rate, n)


def load_image_array(path: str) -> np.ndarray:
    """Decode an image file to uint8 RGB ``[H, W, 3]``; MediaError if it cannot be read."""
    _check_file(path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(path, f"cannot decode image: {e}", "undecodable_image") from e


# ------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------


def decode_video(path: str, cfg: SamplingConfig, start: float | None = None, end: float | None = None,
                 fps: float | None = None) -> DecodedFrames:
    """Decode the sampled frames of a video file, GIF or frame folder.

    ``fps`` overrides the assumed rate of a GIF or frame folder. Raises MediaError.
    """
    _check_file(path)
    if os.path.isdir(path):
        return _decode_folder(path, cfg, start, end, fps)
    if path.lower().endswith(".gif"):
        return _decode_gif(path, cfg, start, end, fps)
    if path.lower().endswith(".npy"):
        return _decode_npy(path, cfg, start, end, fps)
    order: list[Callable] = [_decode_decord, _decode_pyav]
    if cfg.backend == "pyav":
        order.reverse()
    if not cfg.fallback:
        order = order[:1]
    errors: list[MediaError] = []
    for decode in order:
        try:
            return decode(path, cfg, start, end)
        except MediaError as e:
            if e.code == "empty_range":
                raise
            errors.append(e)
            if len(order) > 1 and decode is order[0]:
                logger.debug("%s; trying the other backend", e)
    if len(errors) == 1:
        raise errors[0]
    # a backend that opened the file and found no frames is the precise diagnosis
    code = "no_frames" if any(e.code == "no_frames" for e in errors) else errors[0].code
    raise MediaError(path, " | ".join(e.reason for e in errors), code)


def probe_video(path: str, cfg: SamplingConfig | None = None, fps: float | None = None) -> VideoMeta:
    """Frame count, frame rate and size of a video, GIF or frame folder, without decoding pixels."""
    cfg = cfg or SamplingConfig()
    _check_file(path)
    if os.path.isdir(path):
        files = list_frame_files(path)
        if not files:
            raise MediaError(path, "frame folder has no image files", "bad_frame_folder")
        return VideoMeta(len(files), fps or cfg.folder_fps, image_size(files[0]))
    if path.lower().endswith(".gif"):
        try:
            with Image.open(path) as im:
                n = getattr(im, "n_frames", 1)
                rate = fps or cfg.gif_fps or 1000.0 / max(1, im.info.get("duration", 100) or 100)
                return VideoMeta(n, rate, FrameSize(im.height, im.width))
        except (UnidentifiedImageError, OSError) as e:
            raise MediaError(path, f"cannot read GIF header: {e}", "undecodable_video") from e
    if path.lower().endswith(".npy"):
        n, h, w, _ = _npy_shape(path)
        return VideoMeta(n, fps or cfg.npy_fps, FrameSize(h, w))
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(path, "file has no video stream", "not_a_video")
            stream = container.streams.video[0]
            n, rate = _pyav_meta(stream, container)
            size = FrameSize(stream.codec_context.height, stream.codec_context.width)
    except (av.error.FFmpegError, OSError) as e:
        raise open_failure(path, "PyAV", e) from e
    if n == 0 or rate <= 0 or size.height == 0:
        raise MediaError(path, f"header reports {n} frames at {rate} fps, size {size}", "no_frames")
    return VideoMeta(n, rate, size)


def image_size(path: str) -> FrameSize:
    """(height, width) of an image from its header; MediaError if unreadable."""
    _check_file(path)
    try:
        with Image.open(path) as im:
            return FrameSize(im.height, im.width)
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(path, f"cannot read image header: {e}", "undecodable_image") from e


def n_sampled_frames(meta: VideoMeta, cfg: SamplingConfig, start: float | None, end: float | None) -> int:
    """How many frames decoding would return, from header facts only (GIFs: approximate)."""
    return len(sample_indices(meta.n_frames, meta.fps, cfg.video_fps, start, end, cfg.max_frames, cfg.cap))


__all__ = [
    "SamplingConfig", "DecodedFrames", "VideoMeta", "sample_indices", "sample_by_time", "decode_video",
    "probe_video", "image_size", "load_image_array", "n_sampled_frames", "reduced_size",
]
