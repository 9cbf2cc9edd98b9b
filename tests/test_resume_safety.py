"""Resume from a checkpoint that was changed after it was written: real 2-process DeepSpeed ZeRO-2 on
CPU through `longvu train` (test_train's Run helper). A pickle with code in a DeepSpeed shard (the
manifest rewritten to match) is refused in one line and never runs; a changed file is named. And a
save that fails for lack of space (the writer made to raise ENOSPC in every process of the run) says
so, leaves no staged files and keeps the previous checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pickle_helpers import write_malicious
from test_train import TEXT_RECORD, ZERO2, Run, _config
from train.checkpoints import complete_checkpoints, staging_dir, verify_checkpoint
from train.integrity import MANIFEST, write_manifest

pytestmark = pytest.mark.slow

TEXT_2 = {**TEXT_RECORD, "id": "text_1", "conversations": [
    {"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}]}


def _manifest(root: Path) -> Path:
    path = root / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (TEXT_RECORD, TEXT_2)))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A ZeRO-2 run of one step (text records: no media to decode), saved as checkpoint-1."""
    work = tmp_path_factory.mktemp("trained")
    cfg = _config(_manifest(work), work / "out", zero=ZERO2, training={"max_steps": 1, "save_steps": 1})
    run = Run(cfg, work).run().check_ok()
    return run.out


def _resume(trained: Path, tmp_path: Path) -> tuple[Run, Path]:
    """A copy of the trained run folder, and a Run that resumes it (resume: auto) for a second step on the
    same data (a resume refuses a changed data.train_manifest)."""
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    cfg = _config(trained.parent / "text.jsonl", out, zero=ZERO2, training={"max_steps": 2, "save_steps": 1})
    return Run(cfg, tmp_path / "work"), out / "checkpoint-1"


def test_checkpoint_records_its_manifest(trained):
    ckpt = trained / "checkpoint-1"
    recorded = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert {"model.safetensors", "latest", "trainer_state.json"} <= set(recorded)
    assert any(name.startswith("global_step1/") and name.endswith("optim_states.pt") for name in recorded)
    verify_checkpoint(ckpt)


def test_resume_refuses_code_in_a_deepspeed_shard(trained, tmp_path):
    run, ckpt = _resume(trained, tmp_path)
    marker = tmp_path / "CODE_RAN"
    shard = next((ckpt / "global_step1").glob("*optim_states.pt"))
    write_malicious(shard, marker)
    write_manifest(ckpt)  # whoever changed the shard rewrote the manifest to match
    run.run()
    assert run.returncode == 2, run.log[-3000:]
    assert f"longvu train: {shard}: refused" in run.log and "posix.system" in run.log, run.log[-3000:]
    assert "Traceback" not in run.log and "UnpicklingError" not in run.log
    assert not marker.exists()
    assert [p.name for p in complete_checkpoints(ckpt.parent)] == ["checkpoint-1"]


def test_resume_names_a_changed_file(trained, tmp_path):
    run, ckpt = _resume(trained, tmp_path)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    run.run()
    assert run.returncode == 2, run.log[-3000:]
    assert f"longvu train: {weights}: sha256 differs from the manifest" in run.log, run.log[-3000:]
    assert "Traceback" not in run.log


# --- disk full ------------------------------------------------------------------------------------------

# Loaded by every Python process of the run (PYTHONPATH): from checkpoint-2 on, torch.save raises ENOSPC
# (the writer of DeepSpeed's shards and the Trainer's states), and the file system reports 1000 bytes free.
FULL_DISK = """
import errno, os, shutil, collections
import torch
_save = torch.save
def _full(obj, f, *args, **kwargs):
    if "checkpoint-2" in str(f):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return _save(obj, f, *args, **kwargs)
torch.save = _full
shutil.disk_usage = lambda path: collections.namedtuple("Usage", "total used free")(10**12, 10**12, 1000)
"""


def test_a_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FULL_DISK)
    out = tmp_path / "out"
    cfg = _config(_manifest(tmp_path), out, zero=ZERO2, training={"max_steps": 2, "save_steps": 1})
    monkeypatch.setenv("PYTHONPATH", str(hook))  # inherited by the launcher and the ranks
    run = Run(cfg, tmp_path / "work").run()
    assert run.returncode != 0
    log = run.log
    assert "the last checkpoint (checkpoint-1) took" in log  # the warning before the save
    line = next((l for l in log.splitlines() if l.startswith("longvu train: ")), "")
    assert f"{staging_dir(out) / 'checkpoint-2'}/" in line and "No space left on device" in line, log[-3000:]
    assert f"kept {out / 'checkpoint-1'}" in line
    assert not (staging_dir(out) / "checkpoint-2").exists()
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]
    verify_checkpoint(out / "checkpoint-1")
