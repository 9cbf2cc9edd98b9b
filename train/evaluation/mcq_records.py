"""Which manifest records are multiple-choice questions: a list of `options` and an `answer` letter
among them. No torch, so the pre-launch check can read the eval manifest."""

from __future__ import annotations

import os


def is_mcq(record: dict) -> bool:
    """A list of `options` and a one-letter `answer` naming one of them ("A" the first)."""
    options, answer = record.get("options"), record.get("answer")
    return (isinstance(options, list) and isinstance(answer, str) and len(answer) == 1
            and 0 <= ord(answer) - ord("A") < len(options))


def mcq_indices(records: list[dict]) -> list[int]:
    """Indices of the MCQ records."""
    return [i for i, rec in enumerate(records) if is_mcq(rec)]


def has_mcq_record(path: str | os.PathLike) -> bool | None:
    """Whether the manifest at `path` (`data.manifest.read_manifest`: a JSON list or JSONL; bad lines
    are markers, never MCQ) holds an MCQ record; None when it cannot be read (the eval dataset says why)."""
    from data.manifest import read_manifest

    try:
        return any(is_mcq(record) for record in read_manifest(path))
    except (OSError, ValueError):
        return None
