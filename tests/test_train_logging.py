"""`longvu train` from a user's own directory (which holds a `data/` folder of its own), logging to
wandb with no credentials (offline) and to TensorBoard, and profiling a step (`training.profile_steps`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_from_another_directory_logs_offline_to_wandb_and_tensorboard_and_profiles(tmp_path):
    manifest = write_synthetic_dataset(tmp_path / "data", n_images=2, n_videos=2, video_seconds=3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    exe = Path(sys.executable).parent / "longvu"
    done = subprocess.run(
        [str(exe), "train", str(REPO / "configs" / "quickstart_image.yaml"), f"data.train_manifest={manifest}",
         f"training.output_dir={tmp_path / 'run'}", "training.max_steps=2", "training.save_steps=2",
         "training.report_to=[wandb,tensorboard]", "training.profile_steps=1", "training.profile_from_step=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "checkpoint-2" / "trainer_state.json").is_file()
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, "wandb did not log offline"
    assert list((run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    history = json.loads((run / "run_summary.json").read_text())["log_history"]
    logged = [h for h in history if "loss" in h]
    assert logged and all(key in logged[0] for key in ("tokens_per_s", "step_time_s", "frames_in_per_sample",
                                                      "visual_tokens_per_sample", "bad_samples_skipped"))
    summary = (run / "profile" / "rank0.summary.txt").read_text()
    assert summary.startswith("steps 2-2 (1 recorded)")
    regions = {line.split()[0]: int(line.split()[1]) for line in summary.splitlines() if line.startswith("longvu/")}
    assert set(regions) == {"longvu/vision", "longvu/dino", "longvu/siglip", "longvu/connector", "longvu/llm",
                            "longvu/loss"} and min(regions.values()) >= 1
    trace = json.loads((run / "profile" / "rank0.trace.json").read_text())
    assert "longvu/dino" in {e.get("name") for e in trace["traceEvents"]}
