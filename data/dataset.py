"""Map-style dataset: manifest record -> decoded, preprocessed, tokenised sample.

A record that cannot be used (unreadable media, malformed conversation, nothing to learn within
``model_max_length``) is returned as a ``SkippedSample`` carrying the reason; the collator passes it
on and ``BadSampleTracker`` counts it. No other sample is ever substituted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from data.errors import DataError, MediaError, RecordError
from data.manifest import Record, parse_record, read_manifest
from data.media import load_media
from data.video import SamplingConfig
from longvu.constants import DINO_IMAGE_SIZE, SIGLIP_IMAGE_SIZE
from longvu.processing import ConversationError, FrameSize, preprocess_frames, tokenize_conversation

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Settings of the sample pipeline."""

    manifest: str
    media_root: str | None = None
    model_max_length: int = 8192
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    siglip_size: int = SIGLIP_IMAGE_SIZE
    dino_size: int = DINO_IMAGE_SIZE
    decode_timeout_s: float | None = 120.0


@dataclass
class MediaTensors:
    """One preprocessed media item: siglip ``[T, 3, S, S]``, dino ``[T, 3, D, D]``."""

    siglip: torch.Tensor
    dino: torch.Tensor
    size: FrameSize  # original (height, width)
    kind: str  # "image" or "video"


@dataclass
class Sample:
    """A ready training sample; input_ids/labels are LongTensor ``[L]``."""

    index: int
    sample_id: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    media: list[MediaTensors]
    truncated_answer: bool = False

    @property
    def frames_decoded(self) -> int:
        return sum(m.siglip.shape[0] for m in self.media)


@dataclass
class SkippedSample:
    """Marker for a record that could not be loaded, with the reason."""

    index: int
    sample_id: str
    code: str
    reason: str
    path: str | None = None


class LongVUDataset(Dataset):
    """Samples of a JSON/JSONL manifest. ``dataset[i]`` is a Sample or a SkippedSample.

    ``records`` (default: read from ``cfg.manifest``) may come with ``roots``, one media root per
    record (a mixture of sources); otherwise ``cfg.media_root`` serves every record.
    """

    def __init__(self, cfg: DataConfig, tokenizer, records: list[dict] | None = None,
                 roots: list[str] | None = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.records = records if records is not None else read_manifest(cfg.manifest)
        if roots is not None and len(roots) != len(self.records):
            raise ValueError(f"{len(roots)} media roots for {len(self.records)} records")
        self.roots = roots
        logger.info("dataset %s: %d records", cfg.manifest, len(self.records))

    def media_root(self, index: int) -> str | None:
        """Where the relative media paths of record ``index`` start."""
        return self.roots[index] if self.roots is not None else self.cfg.media_root

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> Record:
        """The parsed record at ``index``; raises RecordError."""
        return parse_record(self.records[index], index)

    def load(self, index: int) -> Sample:
        """Build the sample at ``index``; raises DataError (MediaError/RecordError) when unusable."""
        rec = self.record(index)
        try:
            tok = tokenize_conversation(self.tokenizer, rec.conversations, len(rec.media),
                                        self.cfg.model_max_length, record_id=rec.id)
        except ConversationError as e:
            raise RecordError(str(e), e.code, index, rec.id) from e
        media = []
        for ref in rec.media:
            decoded = load_media(ref, self.media_root(index), self.cfg.sampling, self.cfg.decode_timeout_s)
            siglip, dino = preprocess_frames(decoded.frames, self.cfg.siglip_size, self.cfg.dino_size)
            media.append(MediaTensors(siglip, dino, decoded.size, ref.kind))
        return Sample(index, rec.id, tok.input_ids, tok.labels, media, tok.truncated_answer)

    def __getitem__(self, index: int) -> Sample | SkippedSample:
        try:
            return self.load(index)
        except DataError as e:
            raw = self.records[index]
            sid = str(raw.get("id", index)) if isinstance(raw, dict) else str(index)
            path = e.path if isinstance(e, MediaError) else None
            logger.warning("skipping record %d (id %r): [%s] %s", index, sid, e.code, e)
            return SkippedSample(index, sid, e.code, e.reason, path)

