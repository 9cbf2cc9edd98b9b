"""The README's main job: `longvu quickstart` end to end (the installed console script, real DeepSpeed
over two processes): synthetic data -> image stage -> video stage from its checkpoint -> generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quickstart_trains_both_stages_and_answers(tmp_path):
    exe = Path(sys.executable).parent / "longvu"  # the venv's console script
    assert exe.is_file(), "the longvu console script is not installed"
    done = subprocess.run([str(exe), "quickstart", "--output", str(tmp_path), "--steps", "4"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.rindex("\n{") + 1:])

    image_ckpt, video_ckpt = Path(summary["image_stage"]["checkpoint"]), Path(summary["video_stage"]["checkpoint"])
    assert image_ckpt == tmp_path / "runs" / "image" / "checkpoint-4"
    image_cfg = json.loads((image_ckpt / "config.json").read_text())
    video_cfg = json.loads((video_ckpt / "config.json").read_text())
    assert (image_cfg["image_token_len"], image_cfg["highres"]) == (576, False)
    assert (video_cfg["image_token_len"], video_cfg["highres"]) == (144, True)  # the stage switch happened
    for stage in ("image_stage", "video_stage"):
        losses = summary[stage]["losses"]
        assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    assert not (tmp_path / "runs" / "video" / ".staging").exists()
    answer = summary["generate"]
    assert answer["frames_decoded"] == 8 and 1 <= answer["frames_kept"] <= 8 and answer["visual_tokens"] > 0
