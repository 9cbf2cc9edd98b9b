"""Builders on inputs laid out as the published datasets are (written here, in their schemas):

- LongVU's video json (`train_video_data.json`, LongVU `train.py`): LLaVA records whose `video` is an
  mp4, a `.gif` (looked up under `gifs/`) or a `.npy` uint8 [T, H, W, 3] frame array;
- VideoChat2-IT (OpenGVLab/VideoChat2-IT; Ask-Anything `video_chat2/configs/instruction_data.py`):
  `<video|image>/<task>/<source>/train.json` lists of {video|image, QA: [{i, q, a}]}, one media root per split;
- LLaVA-Video-178K (lmms-lab/LLaVA-Video-178K): subset folders of `*_qa_processed.json` /
  `*_cap_processed.json` LLaVA records with the extracted `academic_source/...` videos beside them;
- LLaVA-OneVision-Data parquet shards whose subsets differ in schema.
Each output is then validated (media really decoded) or loaded by the dataset.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.cli import main as data_cli
from data.dataset import DataConfig, LongVUDataset, Sample
from data.manifest import read_manifest
from data_helpers import conv, write_gif, write_image, write_video


def _qa(q="What happens?", a="A dog runs.", i=""):
    return [{"i": i, "q": q, "a": a}]


def _validate(manifest, root, capsys) -> dict:
    report = manifest.parent / "report.json"
    code = data_cli(["validate", str(manifest), "--media-root", str(root), "--workers", "1", "--estimate-text",
                     "--quiet", "--report", str(report)])
    capsys.readouterr()
    return {"code": code, **json.loads(report.read_text())}


# --- LongVU's own video json ------------------------------------------------------------------


@pytest.fixture()
def longvu_video_root(tmp_path):
    root = tmp_path / "videos"
    (root / "webvid").mkdir(parents=True)
    (root / "gifs" / "tgif").mkdir(parents=True)
    (root / "perception").mkdir()
    write_video(str(root / "webvid" / "1.mp4"), n_frames=60, fps=30)
    write_gif(str(root / "gifs" / "tgif" / "2.gif"))
    np.save(root / "perception" / "3.npy", np.random.default_rng(0).integers(0, 256, (5, 24, 32, 3), np.uint8))
    records = [
        {"id": "v1", "video": "webvid/1.mp4", "conversations": conv("<video>\nWhat?")},
        {"id": "v2", "video": "tgif/2.gif", "conversations": conv("<image>\nWhat?")},
        {"id": "v3", "video": "perception/3.npy", "conversations": conv("<video>\nHow many frames?")},
    ]
    (tmp_path / "train_video_data.json").write_text(json.dumps(records))
    return root


def test_longvu_video_json_with_npy_builds_probes_validates_and_loads(longvu_video_root, tmp_path, capsys,
                                                                      qwen_tokenizer):
    out = tmp_path / "o"
    assert data_cli(["build", "videochat2", str(tmp_path / "train_video_data.json"), "--output", str(out),
                     "--probe", "--media-root", str(longvu_video_root), "--quiet"]) == 0
    records = read_manifest(out / "manifest.jsonl")
    assert [r["video"] for r in records] == ["webvid/1.mp4", "gifs/tgif/2.gif", "perception/3.npy"]
    assert records[2]["probe"] == [{"n_frames": 5, "fps": 1.0, "height": 24, "width": 32}]  # npy: 1 fps assumed
    assert records[0]["probe"][0]["n_frames"] == 60 and records[0]["probe"][0]["height"] == 48
    report = _validate(out / "manifest.jsonl", longvu_video_root, capsys)
    assert (report["code"], report["ok"], report["bad"]) == (0, 3, 0)
    # a rebuild from our own manifest never stacks the gif folder
    assert data_cli(["build", "videochat2", str(out / "manifest.jsonl"), "--output", str(tmp_path / "o2"),
                     "--quiet"]) == 0
    assert [r["video"] for r in read_manifest(tmp_path / "o2" / "manifest.jsonl")][1] == "gifs/tgif/2.gif"
    ds = LongVUDataset(DataConfig(str(out / "manifest.jsonl"), str(longvu_video_root), siglip_size=28,
                                  dino_size=28), qwen_tokenizer)
    npy = ds[2]
    assert isinstance(npy, Sample) and npy.frames_decoded == 5 and npy.media[0].size == (24, 32)


def test_prefix_applies_to_llava_json_inputs_once(tmp_path, capsys):
    records = [{"id": "a", "video": "webvid/1.mp4", "conversations": conv("<video>\nQ")},
               {"id": "b", "video": "tgif/2.gif", "conversations": conv("<video>\nQ")},
               {"id": "c", "image": "coco/1.jpg", "conversations": conv("<image>\nQ")}]
    src = tmp_path / "train_video_data.json"
    src.write_text(json.dumps(records))
    assert data_cli(["build", "videochat2", str(src), "--output", str(tmp_path / "v"), "--prefix", "longvu",
                     "--quiet"]) == 0
    built = read_manifest(tmp_path / "v" / "manifest.jsonl")
    assert [r.get("video") or r.get("image") for r in built] == ["longvu/webvid/1.mp4", "longvu/gifs/tgif/2.gif",
                                                                "longvu/coco/1.jpg"]
    assert data_cli(["build", "videochat2", str(tmp_path / "v" / "manifest.jsonl"), "--output", str(tmp_path / "w"),
                     "--prefix", "longvu", "--quiet"]) == 0
    assert read_manifest(tmp_path / "w" / "manifest.jsonl") == built  # nothing stacked on a rebuild
    (tmp_path / "onevision.json").write_text(json.dumps(records[2:]))
    assert data_cli(["build", "onevision", str(tmp_path / "onevision.json"), "--output", str(tmp_path / "ov"),
                     "--prefix", "llava_ov", "--quiet"]) == 0
    assert read_manifest(tmp_path / "ov" / "manifest.jsonl")[0]["image"] == "llava_ov/coco/1.jpg"


# --- VideoChat2-IT ----------------------------------------------------------------------------


@pytest.fixture()
def videochat2_it(tmp_path):
    """The hub layout: annotations under video/<task>/<source>/train.json, media in per-source roots."""
    ann, media = tmp_path / "VideoChat2-IT", tmp_path / "media"
    splits = {
        "video/caption/textvr": [{"video": "Ego_1.mp4", "QA": _qa("", "A man cooks.", "Describe the video.")}],
        "video/vqa/tgif_transition_qa": [{"video": "tumblr_1.gif", "QA": _qa("What does the cat do?", "Jumps.")}],
        "video/classification/ssv2": [{"video": "74225.mp4", "QA": _qa("Which action?", "Pushing."),
                                       "start": 0.0, "end": 1.0},
                                      {"video": "74226.mp4", "QA": []}],
        "image/caption/coco": [{"image": "train2014/1.jpg", "QA": _qa("What is shown?", "A tree.")}],
    }
    for split, records in splits.items():
        (ann / split).mkdir(parents=True)
        (ann / split / "train.json").write_text(json.dumps(records))
    (media / "textvr").mkdir(parents=True)
    (media / "tgif").mkdir()
    (media / "ssv2").mkdir()
    (media / "coco" / "train2014").mkdir(parents=True)
    write_video(str(media / "textvr" / "Ego_1.mp4"), n_frames=30, fps=30)
    write_gif(str(media / "tgif" / "tumblr_1.gif"))
    write_video(str(media / "ssv2" / "74225.mp4"), n_frames=45, fps=30)
    write_image(str(media / "coco" / "train2014" / "1.jpg"))
    yaml_text = "\n".join([
        "caption_textvr: {annotation: video/caption/textvr/train.json, media_root: textvr}",
        "vqa_tgif_transition_qa: {annotation: video/vqa/tgif_transition_qa/train.json, media_root: tgif}",
        f"classification_ssv2: {{annotation: video/classification/ssv2/train.json, media_root: {media / 'ssv2'}}}",
        "caption_coco: {annotation: image/caption/coco/train.json, media_root: coco}", ""])
    (tmp_path / "splits.yaml").write_text(yaml_text)
    return ann, media


def test_videochat2_it_one_command_with_split_media_roots(videochat2_it, tmp_path, capsys):
    ann, media = videochat2_it
    args = ["build", "videochat2", str(ann), "--splits", str(tmp_path / "splits.yaml"), "--output", str(tmp_path / "o"),
            "--quiet"]
    assert data_cli(args) == 0
    summary = capsys.readouterr().out
    assert "skipped 1 records" in summary and "classification_ssv2/1" in summary  # the skipped id is named
    records = read_manifest(tmp_path / "o" / "manifest.jsonl")
    assert [r["id"] for r in records] == ["caption_textvr/0", "vqa_tgif_transition_qa/0", "classification_ssv2/0",
                                          "caption_coco/0"]
    assert records[0]["video"] == "textvr/Ego_1.mp4" and records[3]["image"] == "coco/train2014/1.jpg"
    assert records[2]["video"] == str(media / "ssv2" / "74225.mp4") and records[2]["end"] == 1.0  # absolute root
    report = _validate(tmp_path / "o" / "manifest.jsonl", media, capsys)
    assert (report["code"], report["ok"]) == (0, 4)
    first = (tmp_path / "o" / "manifest.jsonl").read_bytes()
    assert data_cli(args) == 0 and (tmp_path / "o" / "manifest.jsonl").read_bytes() == first  # stable rebuild


def test_videochat2_it_root_and_glob_inputs_name_splits_by_folder(videochat2_it, tmp_path):
    ann, _ = videochat2_it
    assert data_cli(["build", "videochat2", str(ann), "--output", str(tmp_path / "a"), "--quiet"]) == 0
    ids = [r["id"] for r in read_manifest(tmp_path / "a" / "manifest.jsonl")]
    assert sorted(ids) == ["image/caption/coco/0", "video/caption/textvr/0", "video/classification/ssv2/0",
                           "video/vqa/tgif_transition_qa/0"]
    assert data_cli(["build", "videochat2", str(ann / "video" / "*" / "*" / "train.json"), "--output",
                     str(tmp_path / "b"), "--quiet"]) == 0
    ids = [r["id"] for r in read_manifest(tmp_path / "b" / "manifest.jsonl")]
    assert sorted(ids) == ["caption/textvr/0", "classification/ssv2/0", "vqa/tgif_transition_qa/0"]


# --- LLaVA-Video-178K -------------------------------------------------------------------------


def test_llava_video_178k_layout_builds_validates_and_loads(tmp_path, capsys, qwen_tokenizer):
    root = tmp_path / "LLaVA-Video-178K"
    subset = root / "0_30_s_academic_v0_1"
    (subset / "academic_source" / "activitynet").mkdir(parents=True)
    write_video(str(subset / "academic_source" / "activitynet" / "v_abc.mp4"), n_frames=60, fps=30)
    rec = {"id": "v_abc", "video": "academic_source/activitynet/v_abc.mp4", "data_source": "0_30_s_academic_v0_1",
           "conversations": conv("<image>\nDescribe the video in detail.", "A man talks.")}
    oe = dict(rec, conversations=conv("<image>\nWhat is he holding?", "A cup."))
    (subset / "0_30_s_academic_v0_1_cap_processed.json").write_text(json.dumps([rec]))
    (subset / "0_30_s_academic_oe_v0_1_qa_processed.json").write_text(json.dumps([oe]))
    assert data_cli(["build", "llava-video", str(root), "--output", str(tmp_path / "o"), "--quiet"]) == 0
    records = read_manifest(tmp_path / "o" / "manifest.jsonl")
    assert [r["id"] for r in records] == ["0_30_s_academic_oe_v0_1_qa_processed/0", "0_30_s_academic_v0_1_cap_processed/0"]
    assert {r["video"] for r in records} == {"0_30_s_academic_v0_1/academic_source/activitynet/v_abc.mp4"}
    assert records[0]["source_id"] == "v_abc"
    report = _validate(tmp_path / "o" / "manifest.jsonl", root, capsys)
    assert (report["code"], report["ok"]) == (0, 2)
    ds = LongVUDataset(DataConfig(str(tmp_path / "o" / "manifest.jsonl"), str(root), siglip_size=28, dino_size=28),
                       qwen_tokenizer)
    assert isinstance(ds[0], Sample) and ds[0].frames_decoded == 2


# --- atomic, honest builds --------------------------------------------------------------------


def test_failed_build_leaves_the_previous_manifest(videochat2_it, tmp_path, capsys):
    ann, _ = videochat2_it
    out = tmp_path / "o"
    assert data_cli(["build", "videochat2", str(ann), "--output", str(out), "--quiet"]) == 0
    before = (out / "manifest.jsonl").read_bytes()
    (ann / "video" / "caption" / "textvr" / "train.json").write_text("[{\"video\": \"a.mp4\", ")  # broken JSON
    assert data_cli(["build", "videochat2", str(ann), "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "textvr/train.json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (out / "manifest.jsonl").read_bytes() == before and os.listdir(out) == ["manifest.jsonl"]
    assert data_cli(["build", "videochat2", str(ann), "--output", str(tmp_path / "new"), "--quiet"]) == 2
    assert not (tmp_path / "new" / "manifest.jsonl").exists()


def test_parquet_shards_with_different_schemas_are_read_per_file(tmp_path, capsys):
    conv_t = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    turns = conv("Say hi.", "Hi.")
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int64()), "conversations": pa.array([turns, turns], conv_t),
                             "data_source": ["a", "a"]}), str(tmp_path / "subset_a.parquet"))
    pq.write_table(pa.table({"id": ["x-1"], "image": pa.array([None], pa.binary()),
                             "conversations": pa.array([turns], conv_t), "data_source": ["b"]}),
                   str(tmp_path / "subset_b.parquet"))
    assert data_cli(["build", "onevision", str(tmp_path), "--output", str(tmp_path / "o"), "--quiet"]) == 0
    assert [r["id"] for r in read_manifest(tmp_path / "o" / "manifest.jsonl")] == ["1", "2", "x-1"]


@pytest.mark.parametrize("inputs, expected", [
    (["data.yaml"], "data.yaml: not a parquet file"),
    (["a.json", "b.json"], "not several json files"),
])
def test_unsupported_parquet_inputs_get_one_line(tmp_path, capsys, inputs, expected):
    for name in inputs:
        (tmp_path / name).write_text("datasets: []\n" if name.endswith("yaml") else "[]")
    paths = [str(tmp_path / n) for n in inputs]
    assert data_cli(["build", "onevision", *paths, "--output", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o" / "manifest.jsonl").exists()


def test_skip_summary_names_the_first_ids_per_reason(tmp_path, capsys):
    records = [{"id": f"r{i}", "video": "x.mp4", "conversations": conv("no placeholder")} for i in range(25)]
    (tmp_path / "train_video_data.json").write_text(json.dumps(records))
    assert data_cli(["build", "videochat2", str(tmp_path / "train_video_data.json"), "--output", str(tmp_path / "o"),
                     "--quiet"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "placeholder count" in l)
    assert line.split()[0] == "25" and "r0, r1," in line and "r19" in line and "r20" not in line
    assert "(+5 more)" in line
