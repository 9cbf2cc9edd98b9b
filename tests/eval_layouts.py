"""Benchmark folders in each published layout, written at test time (small real videos)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from data.synthetic import write_scene_video


def _video(path: Path, seconds: int, fps: int = 10, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_scene_video(path, seconds=seconds, fps=fps, height=48, width=64, n_scenes=2, seed=seed)


def write_mvbench(root: Path) -> Path:
    """Action Sequence (bounded, Charades videos) with 2 questions, Action Antonym (ssv2) with 2 and
    Episodic Reasoning (a 3-fps TVQA frame folder of 12 frames, bounded) with 1."""
    (root / "json").mkdir(parents=True)
    _video(root / "video/star/Charades_v1_480/a.mp4", 4, seed=1)
    _video(root / "video/ssv2_video/b.webm.mp4", 3, seed=2)
    frames = root / "video/tvqa/frames_fps3_hq/clip1"
    frames.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 13):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(frames / f"{i:05d}.jpg")
    seq = [{"video": "a.mp4", "question": "What did the person do first?", "candidates": ["sat", "ran", "ate"],
            "answer": "ran", "start": 1.0, "end": 3.0},
           {"video": "a.mp4", "question": "And then?", "candidates": ["x", "y"], "answer": "x", "start": 0, "end": 4}]
    antonym = [{"video": "b.webm.mp4", "question": "Which is right?", "candidates": ["up", "down", "none"],
                "answer": "none"},
               {"video": "missing.mp4", "question": "Lost?", "candidates": ["yes", "no"], "answer": "no"}]
    episodic = [{"video": "clip1", "question": "Why?", "candidates": ["a", "b", "c", "d"], "answer": "d",
                 "start": 0.5, "end": 4.0}]
    for name, recs in (("action_sequence", seq), ("action_antonym", antonym), ("episodic_reasoning", episodic)):
        (root / "json" / f"{name}.json").write_text(json.dumps(recs))
    return root


SRT = """1
00:00:00,000 --> 00:00:02,500
[Music]

2
00:00:02,500 --> 00:00:05,000
Hello there.

3
00:00:05,000 --> 00:00:09,000
Hello there.
"""


def write_videomme(root: Path) -> Path:
    """Two videos (6 s and 4 s at 10 fps), three questions on the first, one on the second; an .srt
    for the first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _video(root / "data/vid1.mp4", 6, seed=3)
    _video(root / "data/vid2.mp4", 4, seed=4)
    (root / "subtitle").mkdir(parents=True)
    (root / "subtitle/vid1.srt").write_text(SRT)
    opts = ["A. red", "B. green", "C. blue", "D. black"]
    rows = [("001", "vid1", "short", "001-1", "Counting", "How many?", opts, "A"),
            ("001", "vid1", "short", "001-2", "OCR", "What text?", opts, "B"),
            ("001", "vid1", "short", "001-3", "Action", "What action?", opts, "C"),
            ("002", "vid2", "long", "002-1", "Counting", "Which colour?", opts, "D")]
    cols = ["video_id", "videoID", "duration", "question_id", "task_type", "question", "options", "answer"]
    (root / "videomme").mkdir()
    pq.write_table(pa.table({c: [r[k] for r in rows] for k, c in enumerate(cols)}),
                   root / "videomme/test-00000-of-00001.parquet")
    return root


def write_egoschema(root: Path) -> Path:
    """Four questions: q1..q3 with videos, q1 and q2 in the subset; q4's video is missing (in the subset)."""
    for k, uid in enumerate(("q1", "q2", "q3")):
        _video(root / f"good_clips_git/{uid}.mp4", 6, seed=10 + k)
    recs = [{"q_uid": uid, "google_drive_id": "x", "question": f"What is c happening in {uid}?",
             **{f"option {i}": f"choice {i}" for i in range(5)}} for uid in ("q1", "q2", "q3", "q4")]
    (root / "questions.json").write_text(json.dumps(recs))
    (root / "subset_answers.json").write_text(json.dumps({"q1": 0, "q2": 4, "q4": 1}))
    return root


def write_mlvu(root: Path) -> Path:
    """plotQA (2 questions on one video) and count (1 question)."""
    (root / "json").mkdir(parents=True)
    _video(root / "video/1_plotQA/p.mp4", 6, seed=20)
    _video(root / "video/4_count/c.mp4", 4, seed=21)
    plot = [{"video": "p.mp4", "question": "Who?", "candidates": ["he", "she", "it", "they"], "answer": "it"},
            {"video": "p.mp4", "question": "Where?", "candidates": ["here", "there", "nowhere", "home"],
             "answer": "here"}]
    count = [{"video": "c.mp4", "question": "How many?", "candidates": ["1", "2", "3", "4"], "answer": "3"}]
    (root / "json/1_plotQA.json").write_text(json.dumps(plot))
    (root / "json/4_count.json").write_text(json.dumps(count))
    return root
