"""What every builder shares: input expansion, atomic manifest writing, path prefixes, optional
media probing, and a summary of written/skipped records."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from data.errors import DataError, RecordError
from data.manifest import PROBE_KEYS, parse_record
from data.metadata import MetadataCache
from data.video import SamplingConfig
from longvu.durable import replace_durably

logger = logging.getLogger(__name__)

SHOWN_IDS = 20  # skipped record ids listed per reason


class BuildInputError(ValueError):
    """An input a builder cannot use; the message is one line naming the file and what was expected."""


@dataclass
class BuildOptions:
    """Options shared by the builders."""

    prefix: str = ""  # prepended to every relative media path (never twice)
    probe: bool = False  # record each media item's probe (n_frames, fps, height, width) in the manifest
    media_root: str | None = None  # where relative media paths start, for --probe
    timeout_s: float = 120.0  # per probe
    progress: bool = True


@dataclass
class BuildSummary:
    """Records written and skipped (a count and the first ids per reason) by a builder."""

    source: str
    manifest: str = ""
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_ids: dict = field(default_factory=lambda: defaultdict(list))
    started: float = field(default_factory=time.perf_counter)

    def skip(self, reason: str, record_id: str | None = None) -> None:
        """Count a skipped record, keeping its id (the first SHOWN_IDS per reason)."""
        self.skipped[reason] += 1
        if len(self.skipped_ids[reason]) < SHOWN_IDS:
            self.skipped_ids[reason].append(str(record_id))
        logger.debug("skipped %s: %s", record_id, reason)

    def format(self) -> str:
        """Outcome lines for the CLI: written, then per skip reason its count and first ids."""
        seconds = time.perf_counter() - self.started
        lines = [f"{self.source}: wrote {self.written} records to {self.manifest} "
                 f"({self.written / max(seconds, 1e-9):,.0f} records/s)",
                 f"skipped {sum(self.skipped.values())} records"]
        for reason, n in self.skipped.most_common():
            ids = self.skipped_ids[reason]
            more = f" (+{n - len(ids)} more)" if n > len(ids) else ""
            lines.append(f"  {n:>8}  {reason}: {', '.join(ids)}{more}")
        return "\n".join(lines)


def safe_name(text: str, max_len: int = 120) -> str:
    """A file-name-safe version of an id (other characters become ``_``)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "record"
    return name[:max_len]


def skip_reason(e: DataError) -> str:
    """A stable, human-readable reason for a record rejected by ``parse_record`` or its probe."""
    return {"bad_json": "not a JSON object", "no_conversations": "no conversations", "bad_conversation": "malformed conversations",
            "placeholder_mismatch": "placeholder count does not match the media count",
            "bad_media_field": "malformed image/video/start/end field"}.get(e.code, f"media: {e.code}")


def glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard component (``a/b/*/c.json`` -> ``a/b``)."""
    parts = pattern.split(os.sep)
    first = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
    return os.sep.join(parts[:first]) or "."


def expand_inputs(inputs: Iterable[str], suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(file, root)`` pairs from files, folders (searched recursively) and globs, sorted per input.

    ``root`` is the folder the file was found under (a file's own folder), for naming its split.
    """
    found: list[tuple[str, str]] = []
    for item in inputs:
        if os.path.isdir(item):
            files = [f for s in suffixes for f in glob.glob(os.path.join(glob.escape(item), "**", f"*{s}"),
                                                            recursive=True)]
            root = item
        elif any(c in item for c in "*?["):
            files, root = glob.glob(item, recursive=True), glob_root(item)
        elif os.path.isfile(item):
            files, root = [item], os.path.dirname(item)
        else:
            raise BuildInputError(f"{item}: no such file or folder")
        if not files:
            raise BuildInputError(f"{item}: no {'/'.join(suffixes)} files found there")
        found += [(f, root) for f in sorted(set(files)) if os.path.isfile(f)]
    return found


def add_prefix(path, prefix: str):
    """``prefix/path`` for a relative path (or list of paths) not already under ``prefix``."""
    if isinstance(path, list):
        return [add_prefix(p, prefix) for p in path]
    if not prefix or not isinstance(path, str) or not path or os.path.isabs(path):
        return path
    prefix = prefix.rstrip("/")
    return path if path == prefix or path.startswith(prefix + "/") else f"{prefix}/{path}"


@contextlib.contextmanager
def atomic_manifest(path: str) -> Iterator:
    """A text file that appears at ``path`` only when the block succeeds (else the old one stays),
    flushed to disk before its rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
        replace_durably(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Writer:
    """Checks records, optionally probes their media, and appends them to the manifest file."""

    def __init__(self, summary: BuildSummary, out, opts: BuildOptions) -> None:
        self.summary, self.out, self.opts = summary, out, opts
        self.cache = MetadataCache(timeout_s=opts.timeout_s) if opts.probe else None
        self.sampling = SamplingConfig()

    def write(self, record: dict, index: int) -> None:
        """Append ``record`` if it parses (and its media probe, when asked); else count it as skipped."""
        try:
            rec = parse_record(record, index)
            if self.cache is not None:
                probes = [self.cache.header(ref, self.opts.media_root, self.sampling) for ref in rec.media]
                if probes:
                    record["probe"] = [dict(zip(PROBE_KEYS, p)) for p in probes]
        except (RecordError, DataError) as e:
            self.summary.skip(skip_reason(e), record.get("id"))
            return
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.summary.written += 1
