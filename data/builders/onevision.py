"""LLaVA-OneVision-Data -> JSONL manifest + images on disk.

Inputs:
- parquet shards as published on the hub (columns ``id``, ``image`` (image bytes, nullable),
  ``conversations``, ``data_source``), read with ``datasets`` in streaming mode; each image is
  written as is (no re-encoding) to ``<out>/images/<data_source>/<id>.<ext>``;
- LongVU's converted ``onevision.json`` (a JSON list of LLaVA records whose ``image`` is relative
  to its image folder): records are checked and copied, paths kept.

Skipped records (counted per reason): no conversations, malformed conversations, undecodable
image bytes, placeholder count not matching the media count.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
from typing import Iterable, Iterator

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data.builders.common import BuildSummary, safe_name, skip_reason, write_checked
from data.errors import RecordError
from data.manifest import parse_record, read_manifest

logger = logging.getLogger(__name__)

_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


def parquet_files(inputs: Iterable[str]) -> list[str]:
    """Expand files, folders (searched recursively) and globs into a sorted list of ``.parquet``."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            files += glob.glob(os.path.join(item, "**", "*.parquet"), recursive=True)
        elif any(c in item for c in "*?["):
            files += glob.glob(item, recursive=True)
        else:
            files.append(item)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"parquet input(s) not found: {missing[:5]}")
    return sorted(set(files))


def _image_bytes(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and os.path.isfile(value["path"]):
            with open(value["path"], "rb") as f:
                return f.read()
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) or None
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def _image_format(data: bytes) -> str:
    """PIL format name of encoded image bytes, fully decoding them; raises on bad bytes."""
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
        im.load()
    return fmt


def _iter_parquet(files: list[str]) -> Iterator[dict]:
    import datasets

    ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    if ds.features is not None and isinstance(ds.features.get("image"), datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))
    yield from ds


def _count_rows(files: list[str]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def build_from_parquet(inputs: Iterable[str], out_dir: str, manifest_name: str = "manifest.jsonl",
                       progress: bool = True) -> BuildSummary:
    """Write images and a JSONL manifest under ``out_dir`` from OneVision parquet shards."""
    files = parquet_files(inputs)
    if not files:
        raise FileNotFoundError("no parquet files found in the given inputs")
    os.makedirs(out_dir, exist_ok=True)
    summary = BuildSummary("onevision (parquet)", os.path.join(out_dir, manifest_name))
    used: set[str] = set()
    with open(summary.manifest, "w", encoding="utf-8") as out:
        for i, row in enumerate(tqdm(_iter_parquet(files), total=_count_rows(files), desc="onevision",
                                     unit="rec", disable=not progress)):
            rid = str(row.get("id") or f"row{i}")
            record = {"id": rid, "conversations": row.get("conversations"), "data_source": row.get("data_source")}
            data = _image_bytes(row.get("image"))
            if data is not None:
                try:
                    ext = _EXT.get(_image_format(data), "img")
                except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                    summary.skip("undecodable image bytes", rid)
                    logger.debug("%s: %s", rid, e)
                    continue
                source = safe_name(row.get("data_source") or "unknown")
                rel = _unique(os.path.join("images", source, f"{safe_name(rid)}.{ext}"), used)
                record["image"] = rel
            try:
                parse_record(record, i)
            except RecordError as e:
                summary.skip(skip_reason(e), rid)
                continue
            if data is not None:
                os.makedirs(os.path.join(out_dir, os.path.dirname(rel)), exist_ok=True)
                with open(os.path.join(out_dir, rel), "wb") as f:
                    f.write(data)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            summary.written += 1
    return summary


def _unique(rel: str, used: set[str]) -> str:
    stem, ext = os.path.splitext(rel)
    candidate, k = rel, 1
    while candidate in used:
        candidate, k = f"{stem}_{k}{ext}", k + 1
    used.add(candidate)
    return candidate


def build_from_json(path: str, out_dir: str, manifest_name: str = "manifest.jsonl",
                    progress: bool = True) -> BuildSummary:
    """Check and copy LongVU's ``onevision.json`` (JSON list) into a JSONL manifest."""
    records = read_manifest(path)
    os.makedirs(out_dir, exist_ok=True)
    summary = BuildSummary("onevision (json)", os.path.join(out_dir, manifest_name))
    with open(summary.manifest, "w", encoding="utf-8") as out:
        for i, rec in enumerate(tqdm(records, desc="onevision", unit="rec", disable=not progress)):
            write_checked(rec, i, summary, out)
    return summary


def build(inputs: list[str], out_dir: str, progress: bool = True) -> BuildSummary:
    """Dispatch on the input: one ``.json``/``.jsonl`` file -> LongVU json, else parquet shards."""
    if len(inputs) == 1 and inputs[0].endswith((".json", ".jsonl")):
        return build_from_json(inputs[0], out_dir, progress=progress)
    return build_from_parquet(inputs, out_dir, progress=progress)
