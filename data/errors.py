"""Typed errors of the data pipeline. Each names the file or record and a short problem code."""

from __future__ import annotations


class DataError(Exception):
    """Base class: a record or media file that cannot be used. ``code`` is a short problem name."""

    code: str = "bad_record"

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            self.code = code


class MediaError(DataError):
    """A media file that is missing or cannot be decoded.

    Codes: missing_file, empty_file, not_a_video, corrupt_video, undecodable_video,
    undecodable_image, no_frames, bad_frame_folder, decode_timeout.
    """

    code = "undecodable_media"

    def __init__(self, path: str, reason: str, code: str | None = None) -> None:
        super().__init__(reason, code)
        self.path = str(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class RecordError(DataError):
    """A manifest record whose structure is wrong (conversation shape, placeholders, keys).

    Codes: bad_json (a manifest line that is not a UTF-8 JSON object), no_conversations,
    bad_conversation, placeholder_mismatch, bad_media_field, too_long.
    """

    def __init__(self, reason: str, code: str | None = None, index: int | None = None,
                 record_id: str | None = None) -> None:
        super().__init__(reason, code)
        self.index = index
        self.record_id = record_id

    def __str__(self) -> str:
        return f"record {self.index} (id {self.record_id!r}): {self.reason}"


def open_failure(path: str, backend: str, err: Exception) -> MediaError:
    """Classify a container that cannot be opened: a known container header or not a video."""
    with open(path, "rb") as f:
        head = f.read(64)
    known = head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide") or head[:4] in (
        b"\x1a\x45\xdf\xa3", b"RIFF", b"FLV\x01", b"OggS") or head[:1] == b"\x47"
    if known:
        return MediaError(path, f"container header found but {backend} cannot open it "
                                f"(truncated or corrupt file): {err}", "corrupt_video")
    return MediaError(path, f"not a video file ({backend} cannot recognise the format): {err}", "not_a_video")
