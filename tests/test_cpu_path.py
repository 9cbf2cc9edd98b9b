"""The README's CPU-sized path, from a user's own folder with relative paths: LoRA with
configs/lora_tiny.yaml (real DeepSpeed, 2 CPU processes), export from another directory, generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LONGVU = str(Path(sys.executable).parent / "longvu")


def _run(cmd: list[str], cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _usual_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from data.synthetic import write_synthetic_dataset
    from longvu.tiny import save_tiny_towers

    user = tmp_path_factory.mktemp("user")
    write_synthetic_dataset(user / "clips", n_images=0, n_videos=4, video_seconds=4)
    save_tiny_towers(user / "towers")
    _run([LONGVU, "train", str(REPO / "configs" / "lora_tiny.yaml"), "data.train_manifest=clips/manifest.jsonl",
          "model.siglip_path=towers/siglip", "model.dino_path=towers/dino", "training.output_dir=runs/lora",
          "training.max_steps=2", "training.save_steps=2", "training.report_to=[]"], cwd=user)
    return user


def test_run_config_records_absolute_paths(lora_run):
    recorded = json.loads((lora_run / "runs" / "lora" / "run_config.json").read_text())
    assert recorded["model"]["siglip_path"] == str(lora_run / "towers" / "siglip")
    assert recorded["data"]["train_manifest"] == str(lora_run / "clips" / "manifest.jsonl")
    assert recorded["training"]["output_dir"] == str(lora_run / "runs" / "lora")
    assert recorded["deepspeed"] == str(REPO / "configs" / "deepspeed" / "zero2.json")


def test_each_parameter_group_logs_its_learning_rate(lora_run):
    """lora_tiny.yaml: adapters at 1e-3, connector and projector at 1e-4, under one schedule."""
    history = json.loads((lora_run / "runs" / "lora" / "run_summary.json").read_text())["log_history"]
    logged = [h for h in history if "loss" in h]
    assert logged and all("learning_rate" not in h for h in logged)
    assert all({"lr/lora", "lr/connector", "lr/projector"} <= set(h) for h in logged)
    live = [h for h in logged if h["lr/connector"] > 0]  # the cosine schedule ends at 0
    assert live and all(h["lr/lora"] == pytest.approx(10 * h["lr/connector"]) == pytest.approx(
        10 * h["lr/projector"]) for h in live)


def test_checkpoint_files_have_the_usual_mode(lora_run):
    ckpt = lora_run / "runs" / "lora" / "checkpoint-2"
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors", "trainer_state.json"):
        assert (ckpt / name).stat().st_mode & 0o777 == _usual_mode(), name


def test_export_from_another_directory_then_generate(lora_run, tmp_path):
    """The run folder's recorded paths are absolute: export works from anywhere; the export answers."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run([LONGVU, "export", str(lora_run / "runs" / "lora"), "--output", "model", "--merge-lora",
          "--include-towers", "--dtype", "fp32"], cwd=elsewhere)
    model = elsewhere / "model"
    for path in model.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == _usual_mode(), path
    clip = next((lora_run / "clips").rglob("*.mp4"))
    done = _run([LONGVU, "generate", "--model", str(model), "--video", str(clip), "--question",
                 "How many scenes does this clip show?", "--max-new-tokens", "4", "--json"], cwd=tmp_path)
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert isinstance(answer["answer"], str) and answer["frames_decoded"] >= 1 and answer["visual_tokens"] > 0
