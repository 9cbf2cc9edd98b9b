"""The README's main job: `longvu quickstart` end to end (subprocess, the installed console script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_quickstart_generates_on_a_generated_clip(tmp_path):
    exe = Path(sys.executable).parent / "longvu"  # the venv's console script
    assert exe.is_file(), "the longvu console script is not installed"
    done = subprocess.run(
        [str(exe), "quickstart", "--output", str(tmp_path), "--seconds", "20", "--max-new-tokens", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert (tmp_path / "clip.mp4").stat().st_size > 0
    assert summary["frames_decoded"] == 20  # 20 s at 30 fps, sampled at 1 fps from frame 0
    assert summary["frame_size_hw"] == [180, 320]
    assert 1 <= summary["frames_kept"] <= 20
    assert 0 < summary["visual_tokens"] <= 1024 - 16 - 30
    assert 1 <= len(summary["answer_ids"]) <= 3
