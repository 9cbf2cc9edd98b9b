"""What every builder shares: a summary of written/skipped records and path helpers."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field

from data.errors import RecordError
from data.manifest import parse_record

logger = logging.getLogger(__name__)


@dataclass
class BuildSummary:
    """Records written and skipped (with a count per reason) by a builder."""

    source: str
    manifest: str = ""
    written: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str, record_id: str | None = None) -> None:
        """Count a skipped record, logging its id and reason."""
        self.skipped[reason] += 1
        logger.debug("skipped %s: %s", record_id, reason)

    def format(self) -> str:
        """One line per outcome, for the CLI."""
        lines = [f"{self.source}: wrote {self.written} records to {self.manifest}",
                 f"skipped {sum(self.skipped.values())} records"]
        lines += [f"  {n:>8}  {reason}" for reason, n in self.skipped.most_common()]
        return "\n".join(lines)


def safe_name(text: str, max_len: int = 120) -> str:
    """A file-name-safe version of an id (other characters become ``_``)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "record"
    return name[:max_len]


def skip_reason(e: RecordError) -> str:
    """A stable, human-readable reason for a record rejected by ``parse_record``."""
    return {"no_conversations": "no conversations", "bad_conversation": "malformed conversations",
            "placeholder_mismatch": "placeholder count does not match the media count",
            "bad_media_field": "malformed image/video/start/end field"}.get(e.code, e.code)


def write_checked(record: dict, index: int, summary: BuildSummary, out) -> None:
    """Append `record` to the manifest file `out` if it parses; else count it as skipped with the reason."""
    try:
        parse_record(record, index)
    except RecordError as e:
        summary.skip(skip_reason(e), record.get("id"))
        return
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary.written += 1
