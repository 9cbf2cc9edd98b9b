"""Media metadata probes (no pixel decoding), cached on disk, and per-record length estimates."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass

from tqdm import tqdm

from data.errors import DataError
from data.length import estimate_text_tokens
from data.manifest import MediaRef, Record, parse_record, resolve
from data.video import SamplingConfig, VideoMeta, image_size, n_sampled_frames, probe_video
from longvu.compression import visual_token_bound
from longvu.processing import FrameSize

logger = logging.getLogger(__name__)


@dataclass
class MediaMeta:
    """What the length estimate needs about one media item."""

    kind: str
    n_frames: int  # frames decoding would return (1 for an image)
    size: FrameSize


class MetadataCache:
    """Probe results keyed by (path, file size, mtime); optionally persisted as a JSON file."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = str(path) if path else None
        self._lock = threading.Lock()
        self._data: dict[str, list] = {}
        if self.path and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                self._data = json.load(f)

    @staticmethod
    def _key(path: str) -> str:
        st = os.stat(path)
        return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"

    def probe(self, ref: MediaRef, media_root: str | None, cfg: SamplingConfig) -> MediaMeta:
        """MediaMeta of ``ref``; raises MediaError when the header cannot be read."""
        path = resolve(ref.path, media_root)
        key = None
        if os.path.exists(path):
            key = f"{self._key(path)}|{ref.kind}|{ref.fps}"
            hit = self._data.get(key)
            if hit is not None:
                n_total, fps, h, w = hit
                return self._meta(ref, n_total, fps, FrameSize(h, w), cfg)
        if ref.kind == "image":
            size, n_total, fps = image_size(path), 1, 0.0
        else:
            vm = probe_video(path, cfg, ref.fps)
            size, n_total, fps = vm.size, vm.n_frames, vm.fps
        if key is not None:
            with self._lock:
                self._data[key] = [n_total, fps, size.height, size.width]
        return self._meta(ref, n_total, fps, size, cfg)

    @staticmethod
    def _meta(ref: MediaRef, n_total: int, fps: float, size: FrameSize, cfg: SamplingConfig) -> MediaMeta:
        if ref.kind == "image":
            return MediaMeta("image", 1, size)
        n = n_sampled_frames(VideoMeta(n_total, fps, size), cfg, ref.start, ref.end)
        return MediaMeta("video", n, size)

    def save(self) -> None:
        """Write the cache file (atomically), if a path was given."""
        if not self.path:
            return
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._data, f)
        os.replace(tmp, self.path)


@dataclass
class LengthEstimate:
    """Estimated sequence length of a record: text tokens + visual tokens."""

    modality: str
    text_tokens: int
    visual_tokens: int

    @property
    def total(self) -> int:
        return self.text_tokens + self.visual_tokens


def estimate_record(record: Record, media_root: str | None, cfg: SamplingConfig, model_config,
                    cache: MetadataCache) -> LengthEstimate:
    """LengthEstimate of a parsed record from metadata only (visual tokens: the model's
    `visual_token_bound` for `model_config`); raises MediaError for unreadable media."""
    text = estimate_text_tokens(record.conversations)
    visual = 0
    for ref in record.media:
        meta = cache.probe(ref, media_root, cfg)
        visual += visual_token_bound(model_config, meta.kind, meta.n_frames, meta.size.height, meta.size.width,
                                     text, len(record.media))
    return LengthEstimate(record.modality, text, visual)


def estimate_lengths(records: list[dict], media_root: str | None, cfg: SamplingConfig, model_config,
                     cache: MetadataCache | None = None, progress: bool = True) -> list[LengthEstimate | None]:
    """LengthEstimate per raw record (None where the record or its media is unusable, logged)."""
    cache = cache or MetadataCache()
    out: list[LengthEstimate | None] = []
    for i, raw in enumerate(tqdm(records, desc="probing media", disable=not progress, unit="rec")):
        try:
            out.append(estimate_record(parse_record(raw, i), media_root, cfg, model_config, cache))
        except DataError as e:
            logger.warning("record %d: cannot estimate its length: %s", i, e)
            out.append(None)
    cache.save()
    return out
