"""Checkpoint folders on disk: manifests and their check, atomic rotation and replacement under
injected crashes, the free-space warning, a failed (ENOSPC) save, and the pickle check of every
loadable position of a checkpoint. Folders are built here with small files; no training."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from pickle_helpers import write_malicious
from train import checkpoints
from train.checkpoints import (abandon_save, complete_checkpoints, publish_checkpoint, staging_dir,
                               verify_checkpoint, warn_if_low_space)
from train.integrity import MANIFEST, IntegrityError, write_manifest
from train.safe_load import UnsafeCheckpointError

FILES = {"model.safetensors": b"w" * 3000, "trainer_state.json": b"{}", "global_step1/mp_rank_00_model_states.pt": b"",
         "latest": b"global_step1"}


def _fake_checkpoint(root: Path, step: int) -> Path:
    """A `.staging/checkpoint-N` with a few files (the .pt a real torch.save file)."""
    folder = staging_dir(root) / f"checkpoint-{step}"
    for name, data in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data + str(step).encode())
    torch.save({"w": torch.full((2,), float(step))}, folder / "global_step1/mp_rank_00_model_states.pt")
    return folder


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- manifests ----------------------------------------------------------------------------------------


def test_published_checkpoint_records_every_file(tmp_path):
    final = publish_checkpoint(_fake_checkpoint(tmp_path, 1), tmp_path, keep_last=2)
    recorded = json.loads((final / MANIFEST).read_text())["files"]
    assert set(recorded) == set(FILES)
    for name, entry in recorded.items():
        assert entry == {"size": (final / name).stat().st_size, "sha256": _sha256(final / name)}
    verify_checkpoint(final)


@pytest.mark.parametrize("change, expect", [
    (lambda f: f.write_bytes(b"x" + f.read_bytes()[1:]), "model.safetensors: sha256 differs"),
    (lambda f: f.write_bytes(f.read_bytes()[:-1]), "model.safetensors: size 3000 bytes, the manifest records 3001"),
    (lambda f: f.unlink(), "model.safetensors: is missing"),
    (lambda f: (f.parent / "extra.pt").write_bytes(b""), "extra.pt: is not in the manifest"),
], ids=["byte", "truncated", "missing", "extra"])
def test_a_changed_file_is_named(tmp_path, change, expect):
    final = publish_checkpoint(_fake_checkpoint(tmp_path, 1), tmp_path, keep_last=2)
    change(final / "model.safetensors")
    with pytest.raises(IntegrityError, match=expect):
        verify_checkpoint(final)


def test_the_first_differing_file_is_named(tmp_path):
    final = publish_checkpoint(_fake_checkpoint(tmp_path, 1), tmp_path, keep_last=2)
    for name in ("trainer_state.json", "model.safetensors"):
        (final / name).write_bytes(b"?" + (final / name).read_bytes()[1:])
    with pytest.raises(IntegrityError, match=r"checkpoint-1/model.safetensors: sha256"):
        verify_checkpoint(final)


def test_a_checkpoint_is_on_disk_before_it_gets_its_name_and_the_run_folder_after(tmp_path, monkeypatch):
    """Every file and folder of the staged checkpoint is fsynced before the rename (a power loss
    after it finds whole files), the run folder's entry after it."""
    import os

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    staged = _fake_checkpoint(tmp_path, 1)
    final = publish_checkpoint(staged, tmp_path, keep_last=2)
    rename = events.index(("replace", str(staged)))
    synced_before = {path for kind, path in events[:rename] if kind == "fsync"}
    written = {str(staged / p.relative_to(final)) for p in final.rglob("*")} | {str(staged)}
    assert written <= synced_before, sorted(written - synced_before)
    assert ("fsync", str(tmp_path)) in events[rename:]


# --- rotation and replacement: a crash leaves every checkpoint-N complete or absent ------------------


def _crashing_rmtree(path, *args, **kwargs):
    """A kill in the middle of a delete: one file gone, then the process stops."""
    victim = next(p for p in sorted(Path(path).rglob("*")) if p.is_file())
    victim.unlink()
    raise KeyboardInterrupt("killed while deleting")


@pytest.mark.parametrize("step", [3, 2], ids=["rotation", "replacing the same step"])
def test_a_crash_while_deleting_leaves_only_complete_checkpoints(tmp_path, monkeypatch, step):
    publish_checkpoint(_fake_checkpoint(tmp_path, 1), tmp_path, keep_last=2)
    publish_checkpoint(_fake_checkpoint(tmp_path, 2), tmp_path, keep_last=2)
    written = {p.name: _listing(p) for p in complete_checkpoints(tmp_path)}
    staged = _fake_checkpoint(tmp_path, step)
    written[staged.name] = _listing(staged) | {MANIFEST: None}
    monkeypatch.setattr(checkpoints.shutil, "rmtree", _crashing_rmtree)
    with pytest.raises(KeyboardInterrupt):
        publish_checkpoint(staged, tmp_path, keep_last=2)
    monkeypatch.undo()
    left = complete_checkpoints(tmp_path)
    assert left  # the newest checkpoint is always there
    for folder in left:
        got = _listing(folder)
        want = written[folder.name]
        assert got.keys() == want.keys(), folder
        assert all(want[k] is None or got[k] == want[k] for k in got), folder
        verify_checkpoint(folder)
    shutil.rmtree(staging_dir(tmp_path))  # what the next start-up does with the leftovers
    assert [p.name for p in complete_checkpoints(tmp_path)] == [p.name for p in left]


# --- disk full -----------------------------------------------------------------------------------------


def test_low_free_space_warns_before_a_save(tmp_path, monkeypatch, caplog):
    assert warn_if_low_space(tmp_path) is None  # nothing saved yet: nothing to compare with
    final = publish_checkpoint(_fake_checkpoint(tmp_path, 1), tmp_path, keep_last=2)
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file() and p.name != MANIFEST)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: Usage(10**12, 0, size - 1))
    with caplog.at_level("WARNING"):
        message = warn_if_low_space(tmp_path)
    assert message and "checkpoint-1" in message and "No space left on device" in message
    assert message in caplog.text
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: Usage(10**12, 0, size))
    assert warn_if_low_space(tmp_path) is None


def test_a_failed_save_removes_its_staged_files_and_keeps_the_previous(tmp_path):
    previous = publish_checkpoint(_fake_checkpoint(tmp_path, 1), tmp_path, keep_last=1)
    staged = _fake_checkpoint(tmp_path, 2)
    full = OSError(errno.ENOSPC, "No space left on device", str(staged / "model.safetensors"))
    err = abandon_save(staged, tmp_path, full)
    assert str(err).startswith(f"{staged / 'model.safetensors'}: No space left on device")
    assert str(previous) in str(err)
    assert not staged.exists() and complete_checkpoints(tmp_path) == [previous]
    verify_checkpoint(previous)


# --- every loadable position of a checkpoint: a tampered pickle is refused before any load ---------------


@pytest.mark.parametrize("position", [
    "global_step2/mp_rank_00_model_states.pt", "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "rng_state_0.pth", "scheduler.pt", "optimizer.pt", "pytorch_model.bin", "adapter_model.bin",
])
def test_a_tampered_pickle_is_refused_even_with_a_matching_manifest(tmp_path, position):
    marker = tmp_path / "CODE_RAN"
    final = publish_checkpoint(_fake_checkpoint(tmp_path, 2), tmp_path, keep_last=2)
    write_malicious(final / position, marker)
    write_manifest(final)  # whoever tampered with the file rewrote the manifest too
    with pytest.raises(UnsafeCheckpointError, match=rf"{position}: refused: .*posix\.system"):
        verify_checkpoint(final)
    assert not marker.exists()


def test_a_legacy_pickle_of_tensors_passes(tmp_path):
    final = _fake_checkpoint(tmp_path, 1)
    torch.save({"w": torch.ones(3)}, final / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    verify_checkpoint(final)  # no manifest: only the pickles are checked (and a warning logged)
