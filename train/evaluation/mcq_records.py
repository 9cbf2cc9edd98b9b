"""Which manifest records are multiple-choice questions: a list of `options` and an `answer` letter
among them. json only (no torch), so the pre-launch check can read the eval manifest."""

from __future__ import annotations

import json
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
    """Whether the JSON list or JSONL manifest at `path` holds an MCQ record (JSONL: read up to the
    first); None when the file cannot be read or parsed (the eval dataset reports why)."""
    try:
        with open(path, "rb") as f:
            if f.read(1 << 16).lstrip().startswith(b"["):
                f.seek(0)
                records = json.loads(f.read())
                return isinstance(records, list) and any(isinstance(r, dict) and is_mcq(r) for r in records)
            f.seek(0)
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a bad line: the dataset skips and counts it
                    continue
                if isinstance(record, dict) and is_mcq(record):
                    return True
            return False
    except (OSError, ValueError):
        return None
