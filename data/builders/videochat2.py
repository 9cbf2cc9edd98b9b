"""VideoChat2-IT annotations -> JSONL manifest (media stay where they are).

Native layout: each annotation file is a JSON list of ``{"video"|"image": path, "QA": [{"i":
instruction, "q": question, "a": answer}, ...], "start"?: s, "end"?: s}``. Each QA pair becomes a
human/gpt turn pair, in the file's order (VideoChat2 shuffles them at load time; we do not). The
first human turn is ``"<video>\\n"`` (``"<image>\\n"`` for image records) + the first pair's
instruction and question joined by a newline (whichever are non-empty); later turns take their
question (or instruction if the question is empty). ``start``/``end`` are kept, so the dataset
decodes only that time range. ``--prefix`` is prepended to every media path, since each
VideoChat2-IT split has its own media root.

LongVU's ``train_video_data.json`` (LLaVA-style records with ``video`` and ``conversations``) is
accepted too: records are checked and copied; a ``.gif`` path gets the ``gifs/`` folder the
reference looks GIFs up in (unless ``gif_prefix`` is empty).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterable

from tqdm import tqdm

from data.builders.common import BuildSummary, write_checked
from data.manifest import read_manifest

logger = logging.getLogger(__name__)


def _join(*parts: str) -> str:
    return "\n".join(p.strip() for p in parts if p and p.strip())


def qa_to_conversations(qa: list, kind: str) -> list[dict]:
    """VideoChat2 ``QA`` list -> LLaVA turns; raises ValueError when a pair is unusable."""
    if not isinstance(qa, list) or not qa:
        raise ValueError("QA is missing or empty")
    turns = []
    for k, pair in enumerate(qa):
        if not isinstance(pair, dict):
            raise ValueError("a QA pair is not an object")
        answer = pair.get("a")
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError("a QA pair has no answer")
        question = _join(pair.get("i") or "", pair.get("q") or "") if k == 0 else _join(pair.get("q") or pair.get("i") or "")
        if not question:
            raise ValueError("a QA pair has neither instruction nor question")
        if k == 0:
            question = f"<{kind}>\n{question}"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer.strip()}]
    return turns


def convert_native(records: list[dict], source: str, prefix: str, summary: BuildSummary, out,
                   progress: bool = True) -> None:
    """Convert native VideoChat2-IT records and write the valid ones to ``out``."""
    stem = os.path.splitext(os.path.basename(source))[0]
    for i, r in enumerate(tqdm(records, desc=f"videochat2 {stem}", unit="rec", disable=not progress)):
        kind = "video" if r.get("video") else "image" if r.get("image") else None
        rid = f"{stem}_{i}"
        if kind is None:
            summary.skip("no video or image path", rid)
            continue
        try:
            conversations = qa_to_conversations(r.get("QA"), kind)
        except ValueError as e:
            summary.skip(f"bad QA: {e}", rid)
            continue
        record = {"id": rid, kind: os.path.join(prefix, r[kind]) if prefix else r[kind], "conversations": conversations}
        for key in ("start", "end"):
            if r.get(key) is not None:
                record[key] = r[key]
        write_checked(record, i, summary, out)


def convert_llava(records: list[dict], gif_prefix: str, summary: BuildSummary, out, progress: bool = True) -> None:
    """Check LongVU-style LLaVA records, fix GIF paths, write the valid ones to ``out``."""
    for i, r in enumerate(tqdm(records, desc="videochat2 (LongVU json)", unit="rec", disable=not progress)):
        record = dict(r)
        record.setdefault("id", f"video_{i}")
        video = record.get("video")
        if gif_prefix and isinstance(video, str) and video.lower().endswith(".gif"):
            record["video"] = os.path.join(gif_prefix, video)
        write_checked(record, i, summary, out)


def build(inputs: Iterable[str], out_dir: str, prefix: str = "", gif_prefix: str = "gifs",
          manifest_name: str = "manifest.jsonl", progress: bool = True) -> BuildSummary:
    """Convert annotation files (native QA layout or LongVU json, detected per file) to one manifest."""
    os.makedirs(out_dir, exist_ok=True)
    summary = BuildSummary("videochat2", os.path.join(out_dir, manifest_name))
    with open(summary.manifest, "w", encoding="utf-8") as out:
        for path in inputs:
            records = read_manifest(path)
            if any("QA" in r for r in records[:100]):
                convert_native(records, path, prefix, summary, out, progress)
            else:
                convert_llava(records, gif_prefix, summary, out, progress)
    return summary
