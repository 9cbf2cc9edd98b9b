"""LLaVA-OneVision-Data -> JSONL manifest + images on disk.

Inputs:
- parquet shards as published on the hub (columns ``id``, ``image`` (image bytes, nullable),
  ``conversations``, ``data_source``), read with pyarrow one file at a time (subsets differ in
  schema, e.g. ``id`` int in one and string in another); each image is written as is (no
  re-encoding) to ``<out>/images/<data_source>/<id>.<ext>``;
- LongVU's converted ``onevision.json`` (a JSON list of LLaVA records whose ``image`` is relative
  to its image folder): records are checked and copied, paths kept.

``--prefix`` is prepended to the manifest's image paths (not stacked on a rebuild); ``--probe``
records each image's size. The manifest appears only when the build succeeds.

Skipped records (counted per reason): no conversations, malformed conversations, undecodable
image bytes, placeholder count not matching the media count.
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Iterable, Iterator

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data.builders.common import (BuildInputError, BuildOptions, BuildSummary, Writer, add_prefix, atomic_manifest,
                                  expand_inputs, safe_name, skip_reason)
from data.errors import RecordError
from data.manifest import parse_record, read_manifest

logger = logging.getLogger(__name__)

_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


PARQUET_MAGIC = b"PAR1"


def parquet_files(inputs: Iterable[str]) -> list[str]:
    """Parquet shards from files, folders (searched recursively) and globs; BuildInputError for others."""
    files = [f for f, _ in expand_inputs(inputs, (".parquet",))]
    for f in files:
        with open(f, "rb") as fh:
            if fh.read(4) != PARQUET_MAGIC:
                raise BuildInputError(f"{f}: not a parquet file (expected LLaVA-OneVision-Data parquet shards, "
                                      "or one LongVU onevision .json/.jsonl)")
    return files


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


def _image_format(data: bytes) -> tuple[str, int, int]:
    """(PIL format name, height, width) of encoded image bytes, fully decoding them; raises on bad bytes."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.format, im.height, im.width


def _iter_parquet(files: list[str]) -> Iterator[dict]:
    """Rows of each shard in turn, read per file (shards of different subsets may differ in schema)."""
    import pyarrow.parquet as pq

    for f in files:
        shard = pq.ParquetFile(f)
        missing = {"conversations"} - set(shard.schema_arrow.names)
        if missing:
            raise BuildInputError(f"{f}: no {sorted(missing)} column (columns: {shard.schema_arrow.names}); "
                                  "expected LLaVA-OneVision-Data shards (id, image, conversations, data_source)")
        for batch in shard.iter_batches(batch_size=256):
            yield from batch.to_pylist()


def _count_rows(files: list[str]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _image_record(row: dict, i: int, used: set[str], summary: BuildSummary,
                  opts: BuildOptions) -> tuple[dict, str, bytes | None] | None:
    """(manifest record, image file under the output folder, image bytes) of a parquet row; None (counted)
    for undecodable bytes. The manifest path gets ``opts.prefix``; ``opts.probe`` records the image size."""
    rid = str(row["id"]) if row.get("id") not in (None, "") else f"row{i}"
    record = {"id": rid, "conversations": row.get("conversations"), "data_source": row.get("data_source")}
    data = _image_bytes(row.get("image"))
    if data is None:
        return record, "", None
    try:
        fmt, height, width = _image_format(data)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        summary.skip("undecodable image bytes", rid)
        logger.debug("%s: %s", rid, e)
        return None
    source = safe_name(row.get("data_source") or "unknown")
    rel = _unique(os.path.join("images", source, f"{safe_name(rid)}.{_EXT.get(fmt, 'img')}"), used)
    record["image"] = add_prefix(rel, opts.prefix)
    if opts.probe:
        record["probe"] = [{"n_frames": 1, "fps": 0.0, "height": height, "width": width}]
    return record, rel, data


def build_from_parquet(inputs: Iterable[str], out_dir: str, opts: BuildOptions,
                       manifest_name: str = "manifest.jsonl") -> BuildSummary:
    """Write images and a JSONL manifest under ``out_dir`` from OneVision parquet shards."""
    files = parquet_files(inputs)
    os.makedirs(out_dir, exist_ok=True)
    summary = BuildSummary("onevision (parquet)", os.path.join(out_dir, manifest_name))
    used: set[str] = set()
    with atomic_manifest(summary.manifest) as out:
        rows = tqdm(_iter_parquet(files), total=_count_rows(files), desc="onevision", unit="rec",
                    disable=not opts.progress)
        for i, row in enumerate(rows):
            made = _image_record(row, i, used, summary, opts)
            if made is None:
                continue
            record, rel, data = made
            try:
                parse_record(record, i)
            except RecordError as e:
                summary.skip(skip_reason(e), record["id"])
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


def build_from_json(path: str, out_dir: str, opts: BuildOptions, manifest_name: str = "manifest.jsonl") -> BuildSummary:
    """Check and copy LongVU's ``onevision.json`` into a JSONL manifest (``opts.prefix`` on image paths)."""
    records = read_manifest(path)
    summary = BuildSummary("onevision (json)", os.path.join(out_dir, manifest_name))
    with atomic_manifest(summary.manifest) as out:
        writer = Writer(summary, out, opts)
        for i, rec in enumerate(tqdm(records, desc="onevision", unit="rec", disable=not opts.progress)):
            if "image" in rec:
                rec = dict(rec, image=add_prefix(rec["image"], opts.prefix))
            writer.write(rec, i)
    return summary


def build(inputs: list[str], out_dir: str, opts: BuildOptions | None = None) -> BuildSummary:
    """Dispatch on the input: one ``.json``/``.jsonl`` file -> LongVU json, else parquet shards."""
    opts = opts or BuildOptions()
    jsons = [p for p in inputs if p.endswith((".json", ".jsonl"))]
    if len(jsons) > 1 or (jsons and len(inputs) > 1):
        raise BuildInputError(f"{', '.join(inputs[:3])}: expected parquet shards, or exactly one LongVU "
                              "onevision .json/.jsonl, not several json files or a mix")
    if jsons:
        return build_from_json(jsons[0], out_dir, opts)
    return build_from_parquet(inputs, out_dir, opts)
