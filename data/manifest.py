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

from data.errors import RecordError
from longvu.constants import count_placeholders

_NULL_PATHS = ("", "none", "nan", "null")


@dataclass(frozen=True)
class MediaRef:
    """One media item of a record: ``kind`` is "image" or "video"; ``path`` as written."""

    kind: str
    path: str
    start: float | None = None
    end: float | None = None
    fps: float | None = None  # frame rate of a GIF, frame folder or .npy array, overriding the default
    probe: tuple | None = None  # (n_frames, fps, height, width) recorded by a build's --probe


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


BAD_LINE_KEY = "_manifest_error"  # marks a line that is not a JSON object; parse_record rejects it


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Read a JSON list or JSONL manifest.

    A JSONL line that is not UTF-8, not JSON or not an object (and such an element of a JSON list)
    becomes a bad-record marker ``{BAD_LINE_KEY: reason}`` that ``parse_record`` rejects with the
    line number and reason, so training skips and counts it and validation reports it. A JSON list
    file that does not parse as a whole raises ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip()
        f.seek(0)
        if head.startswith(b"["):
            return _read_json_list(f, path)
        return [_parse_line(line, lineno) for lineno, line in enumerate(f, 1) if line.strip()]


def _read_json_list(f, path: Path) -> list[dict]:
    try:
        records = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"manifest {path}: not a valid UTF-8 JSON list: {e}") from e
    return [r if isinstance(r, dict) else {BAD_LINE_KEY: f"element {i} is a {type(r).__name__}, not an object"}
            for i, r in enumerate(records)]


def _parse_line(line: bytes, lineno: int) -> dict:
    """One JSONL line -> its record, or a bad-record marker naming the line and the reason."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return {BAD_LINE_KEY: f"line {lineno} is not UTF-8: {e}"}
    except json.JSONDecodeError as e:
        return {BAD_LINE_KEY: f"line {lineno} is not valid JSON: {e}"}
    if not isinstance(record, dict):
        return {BAD_LINE_KEY: f"line {lineno} is a JSON {type(record).__name__}, not an object"}
    return record


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


PROBE_KEYS = ("n_frames", "fps", "height", "width")


def _probes(value, n_media: int, index: int, rid: str) -> list[tuple | None]:
    """The recorded ``probe`` list (one {n_frames, fps, height, width} per media item) as tuples."""
    if value is None:
        return [None] * n_media
    ok = isinstance(value, list) and len(value) == n_media and all(
        isinstance(p, dict) and all(isinstance(p.get(k), (int, float)) and not isinstance(p.get(k), bool)
                                    for k in PROBE_KEYS) for p in value)
    if not ok:
        raise RecordError(f"'probe' must list one {{{', '.join(PROBE_KEYS)}}} object per media item, got "
                          f"{value!r:.100}", "bad_media_field", index, rid)
    return [tuple(p[k] for k in PROBE_KEYS) for p in value]


def parse_record(record: dict, index: int) -> Record:
    """Check a raw record's structure and return a Record; raises RecordError with a problem code.

    Checks: conversations present and a list of {from, value} strings, media fields well formed,
    placeholders (in all turns) equal to the number of media items. The conversation's turn order
    is checked later by tokenisation.
    """
    if BAD_LINE_KEY in record:
        raise RecordError(record[BAD_LINE_KEY], "bad_json", index, str(index))
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
    probes = _probes(record.get("probe"), len(images) + len(videos), index, rid)
    media = [MediaRef("image", p, probe=probes[k]) for k, p in enumerate(images)]
    media += [MediaRef("video", p, start, end, fps, probes[len(images) + k]) for k, p in enumerate(videos)]
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


def missing_reason(path: str, media_root: str | os.PathLike | None) -> str:
    """Why a media item is not found: the resolved path and the root it was resolved against."""
    if media_root is None or os.path.isabs(path):
        return f"file does not exist (manifest path {path!r}, no media root applied)"
    return (f"file does not exist (manifest path {path!r} resolved against media root {str(media_root)!r}; "
            "wrong --media-root / data.media_root?)")
