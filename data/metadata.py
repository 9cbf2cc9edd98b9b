"""Media metadata probes (no pixel decoding), cached on disk, and per-record length estimates.

Before step 1 every record's media is probed once (frame count, rate, size), unless the manifest
records the probe (``probe``, written by ``longvu data build ... --probe``): then no file is opened.
With a tokenizer each conversation is counted too, exactly as the dataset tokenises it
(``MetadataCache.text_tokens``). In a distributed run each rank probes and counts its share of the
records (``probe_shared``) and the ranks merge their results through the cache in the run folder,
which a resumed run reuses. Every probe
runs under the decode timeout, so a FIFO or a dead mount gives a bad record, not a hang.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from tqdm import tqdm

from data.errors import DataError, RecordError
from data.length import estimate_text_tokens
from data.manifest import MediaRef, Record, parse_record, resolve
from data.media import require_media, run_with_timeout
from data.video import SamplingConfig, VideoMeta, image_size, n_sampled_frames, probe_video
from longvu.compression import visual_token_bound
from longvu.durable import write_text_durably
from longvu.processing import ConversationError, FrameSize, check_conversation, count_conversation_tokens

logger = logging.getLogger(__name__)


@dataclass
class MediaMeta:
    """What the length estimate needs about one media item."""

    kind: str
    n_frames: int  # frames decoding would return (1 for an image)
    size: FrameSize


def tokenizer_fingerprint(tokenizer) -> str:
    """A short digest of the tokenizer's full definition (cached on the tokenizer object)."""
    cached = getattr(tokenizer, "_longvu_fingerprint", None)
    if cached is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
        cached = hashlib.sha256(spec.encode()).hexdigest()[:16]
        tokenizer._longvu_fingerprint = cached
    return cached


def conversation_digest(record: Record) -> str:
    """A digest of what a record's text tokens depend on: its conversation and media count."""
    text = json.dumps([record.conversations, len(record.media)], sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class MetadataCache:
    """Probe results keyed by (path, file size, mtime), and conversations' token counts keyed by
    their content and the tokenizer (`text_tokens`); optionally persisted as a JSON file.

    ``timeout_s`` bounds each probe (stat included). Shard files ``<path>.rank<r>.json`` written by
    ``save_shard`` are read too, so the ranks of a run share what each of them probed.
    """

    def __init__(self, path: str | os.PathLike | None = None, timeout_s: float | None = 120.0) -> None:
        self.path = str(path) if path else None
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._data: dict[str, list] = {}
        self._failed: dict[str, DataError] = {}  # this process's failed probes, not retried
        self.probed = 0  # files actually opened by this cache
        self.reload()

    def reload(self) -> None:
        """Read the cache file and any rank shards beside it."""
        if not self.path:
            return
        for file in [self.path, *sorted(glob.glob(f"{glob.escape(self.path)}.rank*.json"))]:
            if os.path.isfile(file):
                with open(file, encoding="utf-8") as f:
                    self._data.update(json.load(f))

    def __len__(self) -> int:
        return len(self._data)

    @staticmethod
    def _key(path: str, ref: MediaRef) -> str:
        st = os.stat(path)
        return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{ref.kind}|{ref.fps}"

    def probe(self, ref: MediaRef, media_root: str | None, cfg: SamplingConfig) -> MediaMeta:
        """MediaMeta of ``ref``; raises MediaError when the header cannot be read (or times out)."""
        if ref.probe is not None:
            n_total, fps, h, w = ref.probe
            return self._meta(ref, int(n_total), float(fps), FrameSize(int(h), int(w)), cfg)
        n_total, fps, h, w = self.header(ref, media_root, cfg)
        return self._meta(ref, n_total, fps, FrameSize(h, w), cfg)

    def header(self, ref: MediaRef, media_root: str | None, cfg: SamplingConfig) -> list:
        """[n_frames, fps, height, width] of ``ref``'s file, under the timeout; raises MediaError."""
        path = resolve(ref.path, media_root)
        if path in self._failed:
            raise self._failed[path]
        try:
            return run_with_timeout(lambda: self._header(ref, media_root, cfg), self.timeout_s, path)
        except DataError as e:
            self._failed[path] = e
            raise

    def _header(self, ref: MediaRef, media_root: str | None, cfg: SamplingConfig) -> list:
        """[n_frames, fps, height, width] from the cache or the file's header."""
        path = require_media(ref, media_root)
        key = self._key(path, ref)
        hit = self._data.get(key)
        if hit is not None:
            return hit
        if ref.kind == "image":
            size, n_total, fps = image_size(path), 1, 0.0
        else:
            vm = probe_video(path, cfg, ref.fps)
            size, n_total, fps = vm.size, vm.n_frames, vm.fps
        entry = [n_total, fps, size.height, size.width]
        with self._lock:
            self._data[key] = entry
            self.probed += 1
        return entry

    def text_tokens(self, records: Sequence[Record], tokenizer) -> list[int]:
        """Untruncated token count of each record's checked conversation as the dataset renders it,
        cached by the conversation's content and the tokenizer; the missing ones from one batched
        tokenizer call (`longvu.processing.count_conversation_tokens`)."""
        tok = tokenizer_fingerprint(tokenizer)
        keys = [f"text|{tok}|{conversation_digest(rec)}" for rec in records]
        missing = {k: rec for k, rec in zip(keys, records) if k not in self._data}
        if missing:
            counts = count_conversation_tokens(tokenizer, [(rec.conversations, len(rec.media)) for rec in missing.values()])
            with self._lock:
                self._data.update({k: [n] for k, n in zip(missing, counts)})
        return [self._data[k][0] for k in keys]

    @staticmethod
    def _meta(ref: MediaRef, n_total: int, fps: float, size: FrameSize, cfg: SamplingConfig) -> MediaMeta:
        if ref.kind == "image":
            return MediaMeta("image", 1, size)
        n = n_sampled_frames(VideoMeta(n_total, fps, size), cfg, ref.start, ref.end)
        return MediaMeta("video", n, size)

    def save(self, path: str | None = None) -> None:
        """Write the cache (atomically, flushed to disk before its rename) to ``path`` or its own file, if any."""
        path = path or self.path
        if not path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_text_durably(path, json.dumps(self._data))

    def save_shard(self, rank: int) -> None:
        """Write this rank's results beside the cache file, for the other ranks to read."""
        if self.path:
            self.save(f"{self.path}.rank{rank}.json")

    def merge_shards(self) -> None:
        """Read every rank's shard, write the merged cache file and remove the shards (rank 0 only)."""
        if not self.path:
            return
        shards = sorted(glob.glob(f"{glob.escape(self.path)}.rank*.json"))
        for file in shards:
            with open(file, encoding="utf-8") as f:
                self._data.update(json.load(f))
        self.save()
        for file in shards:
            os.remove(file)


@dataclass
class LengthEstimate:
    """Estimated sequence length of a record: text tokens + visual tokens."""

    modality: str
    text_tokens: int
    visual_tokens: int
    media_items: int = 0  # frames (a video's sampled ones) and images: the SVA connector's query sets

    @property
    def total(self) -> int:
        return self.text_tokens + self.visual_tokens


def estimate_record(record: Record, media_root: str | None, cfg: SamplingConfig, model_config,
                    cache: MetadataCache, text_tokens: int | None = None) -> LengthEstimate:
    """LengthEstimate of a parsed record from metadata only (visual tokens: the model's
    `visual_token_bound` for `model_config`; text: `text_tokens`, else `data.length`'s
    over-estimate); raises MediaError for unreadable media."""
    text = estimate_text_tokens(record.conversations) if text_tokens is None else text_tokens
    visual = items = 0
    for ref in record.media:
        meta = cache.probe(ref, media_root, cfg)
        visual += visual_token_bound(model_config, meta.kind, meta.n_frames, meta.size.height, meta.size.width,
                                     text, len(record.media))
        items += meta.n_frames
    return LengthEstimate(record.modality, text, visual, items)


Roots = str | None | Sequence[str | None]


def _root(media_root, index: int) -> str | None:
    """The media root of record ``index``: one for all records, or one per record (mixtures)."""
    return media_root if media_root is None or isinstance(media_root, str) else media_root[index]


TOKENIZE_CHUNK = 1024  # records per batched tokenizer call


def _parsed(raw, index: int, tokenizer) -> Record | DataError:
    """The parsed record, or the RecordError that makes it unusable (with `tokenizer`, its
    conversation is checked as the dataset will check it)."""
    try:
        rec = parse_record(raw, index)
    except DataError as e:
        return e
    if tokenizer is not None:
        try:
            check_conversation(rec.conversations, len(rec.media), record_id=rec.id)
        except ConversationError as e:
            return RecordError(str(e), e.code, index, rec.id)
    return rec


def exact_text_tokens(records: Sequence[Record], tokenizer, model_max_length: int, cache: MetadataCache) -> list[int]:
    """Text tokens of each parsed, checked record as the dataset tokenises it (truncated to
    `model_max_length`, the media placeholders left out: the visual tokens replace them)."""
    counts = cache.text_tokens(records, tokenizer)
    return [min(n, model_max_length) - len(rec.media) for n, rec in zip(counts, records)]


def estimate_lengths(records: list[dict], media_root: Roots, cfg: SamplingConfig, model_config,
                     cache: MetadataCache | None = None, progress: bool = True,
                     tokenizer=None) -> list[LengthEstimate | None]:
    """LengthEstimate per raw record (None where the record or its media is unusable; counted and
    logged). With `tokenizer` the text tokens are exact (`exact_text_tokens`), so packs fill the
    token budget; without it they are `data.length`'s over-estimate."""
    cache = cache if cache is not None else MetadataCache()
    out: list[LengthEstimate | None] = []
    bad: Counter = Counter()
    bar = tqdm(total=len(records), desc="probing media", disable=not progress, unit="rec")
    for start in range(0, len(records), TOKENIZE_CHUNK):
        chunk = [_parsed(records[i], i, tokenizer) for i in range(start, min(start + TOKENIZE_CHUNK, len(records)))]
        usable = [rec for rec in chunk if isinstance(rec, Record)]
        texts = dict(zip((rec.index for rec in usable), exact_text_tokens(
            usable, tokenizer, model_config.tokenizer_model_max_length, cache))) if tokenizer is not None else {}
        for i, rec in enumerate(chunk, start):
            try:
                if isinstance(rec, DataError):
                    raise rec
                out.append(estimate_record(rec, _root(media_root, i), cfg, model_config, cache, texts.get(i)))
            except DataError as e:
                bad[e.code] += 1
                if sum(bad.values()) <= 20:
                    logger.warning("record %d: cannot estimate its length: [%s] %s", i, e.code, e)
                out.append(None)
            bar.update()
    bar.close()
    if bad:
        logger.warning("%d of %d records could not be probed (they are skipped when loaded): %s",
                       sum(bad.values()), len(records), dict(bad.most_common()))
    cache.save()
    return out


def probe_shared(records: list[dict], media_root: Roots, cfg: SamplingConfig, cache: MetadataCache,
                 rank: int = 0, world_size: int = 1, barrier: Callable[[], None] | None = None,
                 tokenizer=None) -> None:
    """Fill ``cache`` so that each media file is probed, and with `tokenizer` each conversation
    counted, by one rank only.

    Rank ``r`` takes records ``r, r + world_size, ...`` (errors are left for ``estimate_lengths``
    to count), writes its shard; after a barrier every rank reads all shards, and after a second one
    rank 0 merges them into the cache file. Records with a recorded probe open no file. Without a
    barrier (one process) this is a plain probing pass.
    """
    pending: list[Record] = []
    for i in tqdm(range(rank, len(records), world_size), desc=f"probing media (rank {rank})",
                  disable=rank != 0, unit="rec"):
        rec = _parsed(records[i], i, tokenizer)
        if not isinstance(rec, Record):
            continue
        for ref in rec.media:
            try:
                cache.probe(ref, _root(media_root, i), cfg)
            except DataError:
                pass  # counted, with its reason, by estimate_lengths
        if tokenizer is not None:
            pending.append(rec)
            if len(pending) == TOKENIZE_CHUNK:
                cache.text_tokens(pending, tokenizer)
                pending = []
    if pending:
        cache.text_tokens(pending, tokenizer)
    if barrier is None or world_size == 1:
        cache.save()
        return
    cache.save_shard(rank)
    barrier()
    cache.reload()
    barrier()
    if rank == 0:
        cache.merge_shards()
