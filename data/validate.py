"""Manifest validation: every record is parsed, its media decoded and its length estimated.

Problems (one entry per problem in the report): the RecordError codes (no_conversations,
bad_conversation, placeholder_mismatch, bad_media_field, too_long) and the MediaError codes
(missing_file, empty_file, not_a_video, corrupt_video, undecodable_video, undecodable_image,
no_frames, empty_range, bad_frame_folder, decode_timeout).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from data.errors import DataError, MediaError
from data.length import estimate_text_tokens
from data.manifest import parse_record, read_manifest
from data.media import load_media
from data.video import SamplingConfig
from longvu.compression import visual_token_bound
from longvu.config import LongVUConfig
from longvu.processing import ConversationError, check_conversation, tokenize_conversation

logger = logging.getLogger(__name__)

HISTOGRAM_EDGES = (0, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class ValidateConfig:
    """What the validator checks against."""

    media_root: str | None = None
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_side=128))
    model: LongVUConfig = field(default_factory=LongVUConfig)  # the budget numbers (image_token_len, max length)
    decode_timeout_s: float | None = 120.0
    workers: int = 1


@dataclass
class RecordResult:
    """Outcome for one record; ``problems`` holds dicts with code, reason and path."""

    index: int
    id: str
    modality: str | None
    tokens: int | None
    problems: list[dict]


def check_record(raw: dict, index: int, cfg: ValidateConfig, tokenizer=None) -> RecordResult:
    """Validate one raw record (never raises a DataError: problems are returned)."""
    rid = str(raw.get("id", index)) if isinstance(raw, dict) else str(index)
    try:
        rec = parse_record(raw, index)
        check_conversation(rec.conversations, len(rec.media), record_id=rec.id)
        if tokenizer is not None:
            ids = tokenize_conversation(tokenizer, rec.conversations, len(rec.media),
                                        cfg.model.tokenizer_model_max_length).input_ids
            text = len(ids) - len(rec.media)  # placeholders are replaced by the visual tokens
        else:
            text = estimate_text_tokens(rec.conversations)
    except DataError as e:
        return RecordResult(index, rid, None, None, [{"code": e.code, "reason": e.reason, "path": None}])
    except ConversationError as e:
        return RecordResult(index, rid, None, None, [{"code": e.code, "reason": str(e), "path": None}])
    problems = []
    visual = 0
    for ref in rec.media:
        try:
            decoded = load_media(ref, cfg.media_root, cfg.sampling, cfg.decode_timeout_s)
        except MediaError as e:
            problems.append({"code": e.code, "reason": e.reason, "path": e.path})
            continue
        visual += visual_token_bound(cfg.model, ref.kind, len(decoded.frames), decoded.size.height,
                                     decoded.size.width, text, len(rec.media))
    return RecordResult(index, rec.id, rec.modality, None if problems else text + visual, problems)


_STATE: dict = {}


def _init_worker(records: list[dict], cfg: ValidateConfig, tokenizer) -> None:
    _STATE.update(records=records, cfg=cfg, tokenizer=tokenizer)


def _check_index(index: int) -> RecordResult:
    return check_record(_STATE["records"][index], index, _STATE["cfg"], _STATE["tokenizer"])


def histogram(values: list[int], edges=HISTOGRAM_EDGES) -> dict[str, int]:
    """Counts per ``[lo, hi)`` bin of ``edges`` plus an open last bin."""
    labels = [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])] + [f">={edges[-1]}"]
    counts = dict.fromkeys(labels, 0)
    for v in values:
        k = sum(v >= e for e in edges[1:])
        counts[labels[k]] += 1
    return counts


def validate_manifest(manifest: str, cfg: ValidateConfig, tokenizer=None, progress: bool = True) -> dict:
    """Check every record of ``manifest``; returns the report dict (see ``write_report``)."""
    records = read_manifest(manifest)
    if cfg.workers > 1 and len(records) > 1:
        with ProcessPoolExecutor(cfg.workers, initializer=_init_worker, initargs=(records, cfg, tokenizer)) as ex:
            chunk = max(1, min(64, len(records) // (cfg.workers * 8)))
            results = list(tqdm(ex.map(_check_index, range(len(records)), chunksize=chunk), total=len(records),
                                desc="validating", unit="rec", disable=not progress))
    else:
        results = [check_record(r, i, cfg, tokenizer)
                   for i, r in enumerate(tqdm(records, desc="validating", unit="rec", disable=not progress))]
    bad = [r for r in results if r.problems]
    by_problem = Counter(p["code"] for r in bad for p in r.problems)
    by_modality = Counter(r.modality or "unparsed" for r in results)
    bad_by_modality = Counter(r.modality or "unparsed" for r in bad)
    return {
        "manifest": os.path.abspath(manifest),
        "media_root": cfg.media_root,
        "total": len(results),
        "ok": len(results) - len(bad),
        "bad": len(bad),
        "by_modality": {m: {"total": n, "bad": bad_by_modality.get(m, 0)} for m, n in sorted(by_modality.items())},
        "by_problem": dict(sorted(by_problem.items())),
        "token_histogram": histogram([r.tokens for r in results if r.tokens is not None]),
        "bad_records": [{"index": r.index, "id": r.id, "path": p["path"], "problem": p["code"], "reason": p["reason"]}
                        for r in bad for p in r.problems],
    }


SHOWN_BAD_RECORDS = 10


def format_summary(report: dict, shown: int = SHOWN_BAD_RECORDS) -> str:
    """Human-readable summary: counts per modality and per problem, the length histogram, and the first
    `shown` bad records (index, id, problem, reason, path) with how many more the report holds."""
    lines = [f"{report['total']} records: {report['ok']} ok, {report['bad']} bad"]
    lines.append("by modality:")
    lines += [f"  {m:<9} {c['total']:>8} ({c['bad']} bad)" for m, c in report["by_modality"].items()]
    if report["by_problem"]:
        lines.append("by problem:")
        lines += [f"  {p:<20} {n:>8}" for p, n in report["by_problem"].items()]
    lines.append("estimated tokens per record:")
    top = max(report["token_histogram"].values(), default=0) or 1
    for b, n in report["token_histogram"].items():
        lines.append(f"  {b:>11} {n:>8} {'#' * round(40 * n / top)}")
    bad = report["bad_records"]
    if bad:
        lines.append(f"first bad records ({min(shown, len(bad))} of {len(bad)} problems):")
        for b in bad[:shown]:
            where = f" ({b['path']})" if b["path"] else ""
            lines.append(f"  #{b['index']} {b['id']}: {b['problem']}: {b['reason']}{where}")
        if len(bad) > shown:
            lines.append(f"  ... {len(bad) - shown} more: --report FILE.json lists them all")
    return "\n".join(lines)


def write_report(report: dict, path: str) -> None:
    """Write the report as JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)


__all__ = ["ValidateConfig", "RecordResult", "check_record", "validate_manifest", "format_summary",
           "write_report", "histogram"]
