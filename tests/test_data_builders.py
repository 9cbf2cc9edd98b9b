"""Builders on small inputs written here: OneVision parquet shards and json, VideoChat2-IT QA files and
LongVU's train_video_data.json, through the `longvu data build` CLI entry."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data.cli import main as data_cli
from data.manifest import parse_record, read_manifest


def _png(h: int = 6, w: int = 8, value: int = 50) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((10, 12, 3), 99, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _turns(q: str, a: str = "An answer.") -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _write_shards(folder) -> dict[str, bytes]:
    """Two shards: one written by `datasets` (Image feature), one by pyarrow (struct bytes/path)."""
    import datasets

    features = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(),
        "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        "data_source": datasets.Value("string")})
    png, jpg = _png(), _jpeg()
    shard0 = {
        "id": ["img/1", "text-2", "broken-3", "noconv-4"],
        "image": [{"bytes": png, "path": None}, None, None, {"bytes": png, "path": None}],
        "conversations": [_turns("<image>\nWhat colour?"), _turns("Say hi."), _turns("<image>\nNo image here"), []],
        "data_source": ["chart qa", "text", "x", "x"],
    }
    datasets.Dataset.from_dict(shard0, features=features).to_parquet(str(folder / "part-0.parquet"))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    conv_t = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    table = pa.table({
        "id": ["img/1", "bad-bytes-6", "img/1"],
        "image": pa.array([{"bytes": jpg, "path": None}, {"bytes": b"not an image", "path": None},
                           {"bytes": png, "path": None}], type=struct),
        "conversations": pa.array([_turns("<image>\nSame id, a JPEG"), _turns("<image>\nQ"),
                                   _turns("<image>\nSame id, a PNG again")], type=conv_t),
        "data_source": ["chart qa", "x", "chart qa"],
    })
    os.makedirs(folder / "sub")
    pq.write_table(table, str(folder / "sub" / "part-1.parquet"))
    return {"png": png, "jpg": jpg}


def test_onevision_parquet(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    blobs = _write_shards(src)
    out = tmp_path / "out"
    assert data_cli(["build", "onevision", str(src), "--output", str(out), "--quiet"]) == 0
    summary = capsys.readouterr().out
    records = read_manifest(out / "manifest.jsonl")
    assert [r["id"] for r in records] == ["img/1", "text-2", "img/1", "img/1"]
    assert records[0]["image"] == "images/chart_qa/img_1.png"
    assert records[2]["image"] == "images/chart_qa/img_1.jpg"  # extension from the bytes' format
    assert records[3]["image"] == "images/chart_qa/img_1_1.png"  # a repeated id gets a new file
    assert "image" not in records[1]  # text-only stays text-only
    assert (out / records[0]["image"]).read_bytes() == blobs["png"]  # written as is
    assert (out / records[2]["image"]).read_bytes() == blobs["jpg"]
    assert (out / records[3]["image"]).read_bytes() == blobs["png"]
    assert records[0]["conversations"] == _turns("<image>\nWhat colour?") and records[0]["data_source"] == "chart qa"
    for i, r in enumerate(records):
        parse_record(r, i)
    assert "wrote 4 records" in summary and "skipped 3 records" in summary
    for reason in ("undecodable image bytes", "no conversations", "placeholder count does not match"):
        assert reason in summary


def test_onevision_longvu_json(tmp_path, capsys):
    records = [
        {"id": "a", "image": "coco/1.jpg", "conversations": _turns("<image>\nQ")},
        {"id": "b", "image": "nan", "conversations": _turns("text only")},
        {"id": "c", "image": "coco/2.jpg", "conversations": _turns("no placeholder")},
        {"id": "d", "image": "coco/3.jpg"},
    ]
    src = tmp_path / "onevision.json"
    src.write_text(json.dumps(records))
    assert data_cli(["build", "onevision", str(src), "--output", str(tmp_path / "o"), "--quiet"]) == 0
    out = read_manifest(tmp_path / "o" / "manifest.jsonl")
    assert out == records[:2]
    assert parse_record(out[1], 1).media == []
    assert "skipped 2 records" in capsys.readouterr().out


def test_videochat2_native_qa(tmp_path, capsys):
    ann = [
        {"video": "clips/a.mp4", "start": 2.0, "end": 9.5,
         "QA": [{"i": "Watch carefully.", "q": "What is the man doing?", "a": "Running."},
                {"i": "", "q": "Where?", "a": "In a park."}]},
        {"video": "clips/b.mp4", "QA": [{"i": "Describe the video in detail.", "q": "", "a": "A cat sleeps."}]},
        {"image": "imgs/c.jpg", "QA": [{"i": "", "q": "What is shown?", "a": "A tree."}]},
        {"video": "clips/d.mp4", "QA": [{"i": "", "q": "", "a": "x"}]},
        {"video": "clips/e.mp4", "QA": []},
        {"QA": [{"q": "?", "a": "x"}]},
    ]
    src = tmp_path / "k710.json"
    src.write_text(json.dumps(ann))
    assert data_cli(["build", "videochat2", str(src), "--output", str(tmp_path / "o"), "--prefix", "k710", "--quiet"]) == 0
    out = read_manifest(tmp_path / "o" / "manifest.jsonl")
    assert out[0] == {
        "id": "k710/0", "video": "k710/clips/a.mp4", "start": 2.0, "end": 9.5, "data_source": "k710",
        "conversations": [
            {"from": "human", "value": "<video>\nWatch carefully.\nWhat is the man doing?"},
            {"from": "gpt", "value": "Running."},
            {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "In a park."}]}
    assert out[1]["conversations"][0]["value"] == "<video>\nDescribe the video in detail." and "start" not in out[1]
    assert out[2]["image"] == "k710/imgs/c.jpg" and out[2]["conversations"][0]["value"] == "<image>\nWhat is shown?"
    assert len(out) == 3
    summary = capsys.readouterr().out
    assert "skipped 3 records" in summary
    for reason in ("neither instruction nor question", "QA is missing or empty", "no video or image path"):
        assert reason in summary
    rec = parse_record(out[0], 0)
    assert (rec.media[0].start, rec.media[0].end, rec.modality) == (2.0, 9.5, "video")


def test_videochat2_longvu_json(tmp_path):
    records = [
        {"id": "v1", "video": "webvid/1.mp4", "conversations": _turns("<video>\nWhat?")},
        {"video": "tgif/2.gif", "conversations": _turns("<video>\nWhat?")},
        {"id": "v3", "video": "x.mp4", "conversations": _turns("missing placeholder")},
    ]
    src = tmp_path / "train_video_data.json"
    src.write_text(json.dumps(records))
    assert data_cli(["build", "videochat2", str(src), "--output", str(tmp_path / "o"), "--quiet"]) == 0
    out = read_manifest(tmp_path / "o" / "manifest.jsonl")
    assert out[0] == records[0]
    assert out[1]["video"] == "gifs/tgif/2.gif" and out[1]["id"] == "video_1"
    assert len(out) == 2


def test_built_manifests_and_the_metadata_cache_are_on_disk_before_they_get_their_names(tmp_path, monkeypatch):
    """A power loss after the rename finds the whole file: it is fsynced before, its folder after."""
    from data.builders.common import atomic_manifest
    from data.metadata import MetadataCache

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(dst))), real_replace(src, dst))[1])
    manifest, cache = tmp_path / "out" / "train.jsonl", tmp_path / "meta.json"
    with atomic_manifest(str(manifest)) as f:
        f.write('{"id": "a"}\n')
    MetadataCache(cache).save()
    for path in (manifest, cache):
        rename = events.index(("replace", str(path)))
        temporary = {p for kind, p in events[:rename] if kind == "fsync" and p.startswith(f"{path}.tmp")}
        assert temporary, f"{path.name} renamed before its contents were flushed"
        assert ("fsync", str(path.parent)) in events[rename:], f"{path.parent} not flushed after the rename"
    assert manifest.read_text() == '{"id": "a"}\n' and json.loads(cache.read_text()) == {}
