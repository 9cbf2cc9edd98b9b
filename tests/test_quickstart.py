"""The README's main job: `longvu quickstart` end to end (the installed console script, real DeepSpeed
over two processes): synthetic data -> image stage -> video stage from its checkpoint -> generate."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_quickstart_trains_both_stages_and_answers(tmp_path):
    exe = Path(sys.executable).parent / "longvu"  # the venv's console script
    assert exe.is_file(), "the longvu console script is not installed"
    extensions = tmp_path / "torch_extensions"  # where a C++ op build would land
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    done = subprocess.run([str(exe), "quickstart", "--output", str(tmp_path), "--steps", "4"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout)  # the summary alone on stdout: `longvu quickstart | jq` works
    assert "meaningless by design" in summary["note"]
    if not torch.cuda.is_available():
        words = re.findall(r"\b(?:GPUs?|gpus?|CUDA\w*|cuda)\b", done.stdout + done.stderr)
        assert not words, f"GPU wording on a CPU machine: {sorted(set(words))}"
        assert not extensions.exists() and "built successfully" not in done.stderr  # nothing compiled

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
    modes = {p.name: p.stat().st_mode & 0o777 for p in video_ckpt.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == 0o666 & ~_umask(), modes  # safetensors alone would write 0600

    # the next steps continue from these outputs: LoRA on its clips with its towers, export, generate
    train, export, generate = (shlex.split(c) for c in summary["next_steps"])
    assert train[:3] == ["longvu", "train", str(Path(__file__).resolve().parents[1] / "configs" / "lora_tiny.yaml")]
    assert f"data.train_manifest={summary['dataset']['videos']}" in train
    assert f"model.siglip_path={summary['towers']['siglip']}" in train
    lora_run = next(a.split("=", 1)[1] for a in train if a.startswith("training.output_dir="))
    assert export[:3] == ["longvu", "export", lora_run] and "--merge-lora" in export
    model = export[export.index("--output") + 1]
    assert generate[:4] == ["longvu", "generate", "--model", model] and answer["clip"] in generate


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
