"""Manifest reading and record parsing (the format is documented in data/README.md).

A manifest is a JSON list of records or a JSONL file (one record per line). A record::

    {"id": "clip-001", "video": "videos/a.mp4", "start": 3.0, "end": 12.5,
     "conversations": [{"from": "human", "value": "<video>\\nWhat happens?"},
                       {"from": "gpt", "value": "A dog runs."}]}

``image`` (a path or a list of paths) or ``video`` (a path or a list) or neither (text-only).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data.errors import RecordError
from longvu.processing import count_placeholders

_NULL_PATHS = ("", "none", "nan", "null")
_VIDEO_ONLY_KEYS = ("start", "end")


@dataclass(frozen=True)
class MediaRef:
    """One media item of a record: ``kind`` is "image" or "video"; ``path`` as written."""

    kind: str
    path: str
    start: float | None = None
    end: float | None = None
    fps: float | None = None  # frame rate of a GIF or frame folder, overriding the default


@dataclass
class Record:
    """A parsed manifest record."""

    index: int
    id: str
    media: list[MediaRef]
    conversations: list[dict]
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def modality(self) -> str:
        """"video" if any video, else "image" if any image, else "text"."""
        kinds = {m.kind for m in self.media}
        return "video" if "video" in kinds else "image" if "image" in kinds else "text"


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Read a JSON list or JSONL manifest; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
        f.seek(0)
        if head.startswith("["):
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"manifest {path}: invalid JSON: {e}") from e
        else:
            records = list(_iter_jsonl(f, path))
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"manifest {path}: record {i} is a {type(r).__name__}, not an object")
    return records


def _iter_jsonl(f, path: Path) -> Iterator[dict]:
    for lineno, line in enumerate(f, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"manifest {path}: line {lineno} is not valid JSON: {e}") from e


def write_jsonl(records, path: str | os.PathLike) -> int:
    """Write records as JSONL; returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def _paths(value, key: str, index: int, rid: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [] if value.strip().lower() in _NULL_PATHS else [value]
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return list(value)
    raise RecordError(f"{key!r} must be a path or a list of paths, got {value!r:.100}", "bad_media_field", index, rid)


def _seconds(record: dict, key: str, index: int, rid: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise RecordError(f"{key!r} must be a non-negative number of seconds, got {value!r}", "bad_media_field", index, rid)
    return float(value)


def parse_record(record: dict, index: int) -> Record:
    """Check a raw record's structure and return a Record; raises RecordError with a problem code.

    Checks: conversations present and a list of {from, value} strings, media fields well formed,
    placeholders (in all turns) equal to the number of media items. The conversation's turn order
    is checked later by tokenisation.
    """
    rid = str(record.get("id", index))
    convs = record.get("conversations")
    if convs is None or convs == []:
        raise RecordError("record has no conversations", "no_conversations", index, rid)
    if not isinstance(convs, list) or not all(
        isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in convs
    ):
        raise RecordError("conversations must be a list of {'from': str, 'value': str}", "bad_conversation", index, rid)
    images = _paths(record.get("image"), "image", index, rid)
    videos = _paths(record.get("video"), "video", index, rid)
    if images and videos:
        raise RecordError("record has both 'image' and 'video'; use one", "bad_media_field", index, rid)
    start, end = _seconds(record, "start", index, rid), _seconds(record, "end", index, rid)
    fps = _seconds(record, "fps", index, rid)
    if start is not None and end is not None and end <= start:
        raise RecordError(f"'end' ({end}) must be after 'start' ({start})", "bad_media_field", index, rid)
    if images and (start is not None or end is not None):
        raise RecordError("'start'/'end' apply to videos only", "bad_media_field", index, rid)
    if fps == 0:
        raise RecordError("'fps' must be positive", "bad_media_field", index, rid)
    media = [MediaRef("image", p) for p in images] + [MediaRef("video", p, start, end, fps) for p in videos]
    n_placeholders = sum(count_placeholders(t["value"]) for t in convs)
    if n_placeholders != len(media):
        raise RecordError(f"{n_placeholders} <image>/<video> placeholder(s) but {len(media)} media item(s)",
                          "placeholder_mismatch", index, rid)
    return Record(index=index, id=rid, media=media, conversations=convs, raw=record)


def resolve(path: str, media_root: str | os.PathLike | None) -> str:
    """Absolute or root-relative path of a media item."""
    if media_root is None or os.path.isabs(path):
        return path
    return os.path.join(media_root, path)
