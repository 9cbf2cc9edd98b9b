"""`longvu data validate` on a manifest of good and broken records: each problem named, exit codes right."""

from __future__ import annotations

import json
import os

import pytest

from data.cli import main as data_cli
from data.validate import histogram
from data_helpers import conv, write_frame_folder, write_gif, write_image, write_video


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    write_video(str(root / "good.mp4"), n_frames=60, fps=30)
    write_image(str(root / "good.png"))
    write_gif(str(root / "good.gif"))
    write_frame_folder(str(root / "frames"))
    (root / "empty.mp4").write_bytes(b"")
    data = (root / "good.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "notes.mp4").write_text("not a video at all\n" * 10)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage, not a JPEG")
    return root


GOOD = [
    {"id": "ok-video", "video": "good.mp4", "conversations": conv("<video>\nQ?", "A.")},
    {"id": "ok-image", "image": "good.png", "conversations": conv("<image>\nQ?", "A.")},
    {"id": "ok-gif", "video": "good.gif", "conversations": conv("<video>\nQ?", "A.")},
    {"id": "ok-folder", "video": "frames", "conversations": conv("<video>\nQ?", "A.")},
    {"id": "ok-text", "conversations": conv("Q?", "A.")},
]
BAD = {  # id -> expected problem
    "zero-bytes": ({"video": "empty.mp4"}, "empty_file"),
    "truncated": ({"video": "truncated.mp4"}, "corrupt_video"),
    "missing": ({"video": "nope.mp4"}, "missing_file"),
    "not-video": ({"video": "notes.mp4"}, "not_a_video"),
    "bad-image": ({"image": "broken.jpg"}, "undecodable_image"),
    "no-conv": ({"image": "good.png", "conversations": []}, "no_conversations"),
    "mismatch": ({"image": "good.png", "conversations": conv("<image> <image>\nQ?", "A.")}, "placeholder_mismatch"),
    "bad-turns": ({"conversations": conv("Q?", "A.")[::-1]}, "bad_conversation"),
}


def _bad_records():
    out = []
    for rid, (fields, _) in BAD.items():
        rec = {"id": rid, **fields}
        if "conversations" not in rec:
            kind = "image" if "image" in rec else "video"
            rec["conversations"] = conv(f"<{kind}>\nQ?", "A.")
        out.append(rec)
    return out


def test_validate_reports_every_problem(root, tmp_path, capsys):
    manifest = tmp_path / "m.json"
    records = GOOD + _bad_records()
    manifest.write_text(json.dumps(records))
    report_path = tmp_path / "report.json"
    code = data_cli(["validate", str(manifest), "--media-root", str(root), "--report", str(report_path),
                     "--workers", "2", "--quiet"])
    assert code == 1
    report = json.loads(report_path.read_text())
    assert (report["total"], report["ok"], report["bad"]) == (13, 5, 8)
    problems = {b["id"]: b for b in report["bad_records"]}
    assert {rid: b["problem"] for rid, b in problems.items()} == {rid: p for rid, (_, p) in BAD.items()}
    assert len({b["reason"] for b in report["bad_records"]}) == 8  # distinct reasons
    for b in report["bad_records"]:
        assert records[b["index"]]["id"] == b["id"]
    assert problems["truncated"]["path"] == os.path.join(str(root), "truncated.mp4")
    assert problems["no-conv"]["path"] is None
    assert report["by_problem"] == {p: 1 for _, p in BAD.values()}
    assert report["by_modality"] == {"image": {"total": 2, "bad": 1}, "text": {"total": 1, "bad": 0},
                                     "unparsed": {"total": 3, "bad": 3}, "video": {"total": 7, "bad": 4}}
    assert sum(report["token_histogram"].values()) == 5
    out = capsys.readouterr().out
    assert "13 records: 5 ok, 8 bad" in out and "corrupt_video" in out


def test_validate_clean_manifest_exits_0(root, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    assert data_cli(["validate", str(manifest), "--media-root", str(root), "--workers", "1",
                     "--estimate-text", "--quiet"]) == 0
    assert "5 records: 5 ok, 0 bad" in capsys.readouterr().out


def test_histogram_bins():
    h = histogram([0, 511, 512, 8191, 20000])
    assert h["0-512"] == 2 and h["512-1024"] == 1 and h["4096-8192"] == 1 and h[">=16384"] == 1


def test_console_lists_the_first_bad_records_with_reasons(root, tmp_path, capsys):
    """Without --report the console names the bad records: index, id, problem and reason, in order."""
    manifest = tmp_path / "m.jsonl"
    records = GOOD + _bad_records()
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert data_cli(["validate", str(manifest), "--media-root", str(root), "--workers", "1",
                     "--estimate-text", "--quiet"]) == 1
    out = capsys.readouterr().out
    lines = out[out.index("first bad records"):].splitlines()
    assert lines[0] == "first bad records (8 of 8 problems):"
    for line, (index, (rid, (_, problem))) in zip(lines[1:], enumerate(BAD.items(), start=len(GOOD))):
        assert line.startswith(f"  #{index} {rid}: {problem}: ")
    assert f"#{len(GOOD) + 2} missing: missing_file: " in out and os.path.join(str(root), "nope.mp4") in out


def test_console_caps_the_list_and_says_how_many_more(root, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"m{i}", "video": f"gone{i}.mp4",
                                            "conversations": conv("<video>\nQ?", "A.")}) + "\n" for i in range(13)))
    assert data_cli(["validate", str(manifest), "--media-root", str(root), "--workers", "1",
                     "--estimate-text", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "first bad records (10 of 13 problems):" in out and "#9 m9: missing_file" in out
    assert "#10 m10" not in out and "... 3 more: --report FILE.json lists them all" in out


def test_unreadable_line_is_one_clear_line(root, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(GOOD[4]) + "\n{not json\n")
    assert data_cli(["validate", str(manifest), "--workers", "1", "--estimate-text", "--quiet"]) == 1
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("  #")]
    assert line.startswith("  #1 1: bad_json: line 2 is not valid JSON: ")


@pytest.mark.parametrize("make", ["missing", "not_a_list"])
def test_missing_or_broken_manifest_is_one_line(tmp_path, capsys, make):
    manifest = tmp_path / "m.json"
    if make == "not_a_list":
        manifest.write_text("[{\"id\": 1}, oops")
    assert data_cli(["validate", str(manifest), "--workers", "1", "--estimate-text", "--quiet"]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    expected = (f"manifest {manifest} does not exist" if make == "missing"
                else f"manifest {manifest}: not a valid UTF-8 JSON list")
    assert line.startswith(f"error: {expected}") and captured.out == ""
