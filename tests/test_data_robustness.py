"""Inputs that used to hang or crash: FIFOs, bad manifest bytes, 0-frame videos, empty manifests,
media under the wrong root; probes recorded in the manifest and shared by the ranks of a run."""

from __future__ import annotations

import json
import os
import threading
import time

import av
import numpy as np
import pytest

from data.cli import main as data_cli
from data.dataset import DataConfig, LongVUDataset, SkippedSample
from data.errors import MediaError
from longvu.config import LongVUConfig
from data.manifest import MediaRef, read_manifest
from data.metadata import MetadataCache, estimate_lengths, probe_shared
from data.video import SamplingConfig, decode_video, probe_video
from data_helpers import conv, write_video


@pytest.fixture()
def fifo(tmp_path):
    """A FIFO no one writes to: opening it for reading blocks. Released at the end of the test."""
    path = tmp_path / "stuck.mp4"
    os.mkfifo(path)
    yield path
    try:  # let a reader blocked in open() return, so no thread stays stuck after the test
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


def test_probe_of_a_fifo_returns_a_bad_record_within_the_timeout(fifo, tmp_path, caplog):
    write_video(str(tmp_path / "ok.mp4"), n_frames=30, fps=30)
    records = [{"id": "stuck", "video": fifo.name, "conversations": conv()},
               {"id": "ok", "video": "ok.mp4", "conversations": conv()}]
    cache = MetadataCache(tmp_path / "meta.json", timeout_s=0.5)
    t0 = time.perf_counter()
    est = estimate_lengths(records, str(tmp_path), SamplingConfig(), LongVUConfig(), cache, progress=False)
    assert time.perf_counter() - t0 < 5
    assert est[0] is None and est[1] is not None
    assert "decode_timeout" in caplog.text and "1 of 2 records could not be probed" in caplog.text


def test_bad_manifest_lines_are_bad_records_with_line_numbers(tmp_path, qwen_tokenizer, capsys):
    good = json.dumps({"id": "t", "conversations": conv("Hi", "Hello")})
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\n".join([good.encode(), b'{"id": "x", "conversations": [', b"\xff\xfe not utf-8",
                                     b"[1, 2]", good.encode()]) + b"\n")
    records = read_manifest(manifest)
    assert len(records) == 5
    ds = LongVUDataset(DataConfig(str(manifest)), qwen_tokenizer)
    skipped = [ds[i] for i in (1, 2, 3)]
    assert all(isinstance(s, SkippedSample) and s.code == "bad_json" for s in skipped)
    assert "line 2 is not valid JSON" in skipped[0].reason and "line 3 is not UTF-8" in skipped[1].reason
    assert "line 4 is a JSON list" in skipped[2].reason
    report = tmp_path / "r.json"
    assert data_cli(["validate", str(manifest), "--estimate-text", "--workers", "1", "--quiet",
                     "--report", str(report)]) == 1
    bad = json.loads(report.read_text())["bad_records"]
    assert [(b["index"], b["problem"]) for b in bad] == [(1, "bad_json"), (2, "bad_json"), (3, "bad_json")]


def _zero_frame_avi(path) -> str:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    return str(path)


def test_zero_frame_videos_are_no_frames(tmp_path):
    avi = _zero_frame_avi(tmp_path / "empty.avi")
    np.save(tmp_path / "empty.npy", np.zeros((0, 24, 32, 3), np.uint8))
    for path in (avi, str(tmp_path / "empty.npy")):
        for fn in (decode_video, probe_video):
            with pytest.raises(MediaError) as err:
                fn(path, SamplingConfig())
            assert err.value.code == "no_frames", (path, fn.__name__, err.value)
    np.save(tmp_path / "float.npy", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(MediaError, match=r"expected uint8 \[T, H, W, 3\]"):
        probe_video(str(tmp_path / "float.npy"))


def test_validate_fails_on_an_empty_manifest(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text("\n")
    assert data_cli(["validate", str(tmp_path / "m.jsonl"), "--estimate-text", "--quiet"]) == 1
    assert "has no records" in capsys.readouterr().err


def test_missing_media_names_the_resolved_path_and_the_root(tmp_path, qwen_tokenizer):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "v", "video": "clips/a.mp4", "conversations": conv()}) + "\n")
    wrong_root = tmp_path / "wrong"
    ds = LongVUDataset(DataConfig(str(manifest), str(wrong_root)), qwen_tokenizer)
    s = ds[0]
    assert s.code == "missing_file" and s.path == str(wrong_root / "clips" / "a.mp4")
    assert f"resolved against media root {str(wrong_root)!r}" in s.reason and "'clips/a.mp4'" in s.reason


def test_recorded_probes_open_no_file(tmp_path):
    records = [{"id": "v", "video": "gone.mp4", "conversations": conv(),
                "probe": [{"n_frames": 300, "fps": 30.0, "height": 48, "width": 64}]}]
    cache = MetadataCache(timeout_s=1)
    est = estimate_lengths(records, str(tmp_path), SamplingConfig(), LongVUConfig(), cache, progress=False)
    assert est[0] is not None and est[0].visual_tokens > 0 and cache.probed == 0  # the file does not even exist
    bad = [dict(records[0], probe=[{"n_frames": 3}])]
    assert estimate_lengths(bad, str(tmp_path), SamplingConfig(), LongVUConfig(), cache, progress=False) == [None]


def test_ranks_share_the_probe_and_a_resumed_run_reuses_it(tmp_path):
    for i in range(6):
        write_video(str(tmp_path / f"{i}.mp4"), n_frames=30, fps=30)
    records = [{"id": str(i), "video": f"{i}.mp4", "conversations": conv()} for i in range(6)]
    cache_file = tmp_path / "run" / "media_metadata.json"
    cache_file.parent.mkdir()
    barrier = threading.Barrier(2)
    caches = [MetadataCache(cache_file) for _ in range(2)]
    threads = [threading.Thread(target=probe_shared, args=(records, str(tmp_path), SamplingConfig(), caches[r], r, 2,
                                                           barrier.wait)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [c.probed for c in caches] == [3, 3]  # each file probed once, by one rank
    assert len(caches[0]) == len(caches[1]) == 6
    assert os.listdir(cache_file.parent) == ["media_metadata.json"]  # shards merged and removed
    resumed = MetadataCache(cache_file)
    est = estimate_lengths(records, str(tmp_path), SamplingConfig(), LongVUConfig(), resumed, progress=False)
    assert all(e is not None for e in est) and resumed.probed == 0


def test_npy_refs_probe_from_the_header(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((7, 20, 30, 3), np.uint8))
    meta = MetadataCache().probe(MediaRef("video", "a.npy"), str(tmp_path), SamplingConfig())
    assert (meta.n_frames, meta.size) == (7, (20, 30))  # 1 fps assumed: every frame at video_fps 1
