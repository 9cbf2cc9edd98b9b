"""The run folder, fast: its lock (one run per folder, stale locks), its lineage (what `resume: auto`
continues, fresh runs into a used folder, config changes on resume, finished runs) and SIGTERM before
training starts. Checkpoints here are folders with a trainer_state.json; nothing trains."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from train.config import config_to_dict, load_run_config


def _config(tmp_path: Path, out: Path, **training):
    path = tmp_path / "run.yaml"
    (tmp_path / "m.jsonl").write_text("{}\n")  # the pre-launch check needs the manifest to exist
    path.write_text(yaml.safe_dump({"data": {"train_manifest": str(tmp_path / "m.jsonl")},
                                    "training": {"output_dir": str(out), "max_steps": 10, **training}}))
    return path, load_run_config(path)


def _checkpoint(run_dir: Path, step: int) -> Path:
    ckpt = run_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": step / 10}))
    return ckpt


# --- the lock ------------------------------------------------------------------------------------


def test_a_second_holder_is_refused_naming_the_first_pid_and_host(tmp_path):
    from train.run_lock import RunFolderLocked, RunLock

    first = RunLock(tmp_path / "run").acquire()
    try:
        with pytest.raises(RunFolderLocked, match=rf"PID {os.getpid()} on host {socket.gethostname()}"):
            RunLock(tmp_path / "run").acquire()
    finally:
        first.release()
    with RunLock(tmp_path / "run"):  # released: free again
        pass
    assert (tmp_path / "run" / ".run.lock").read_text() == ""  # a clean release leaves no holder behind


_HOLD = """
import sys, time
from train.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_stale_lock_of_a_killed_process_is_taken_over_with_a_log_line(tmp_path, caplog):
    from train.run_lock import RunFolderLocked, RunLock

    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderLocked, match=f"PID {holder.pid} "):
            RunLock(tmp_path / "run").acquire()
    finally:
        holder.kill()
        holder.wait()
    caplog.set_level(logging.WARNING, logger="train.run_lock")
    lock = RunLock(tmp_path / "run").acquire()
    lock.release()
    assert f"taking over a stale lock (PID {holder.pid} on host {socket.gethostname()}" in caplog.text


def test_longvu_train_refuses_a_locked_output_folder_before_launching(tmp_path, monkeypatch, capsys):
    from train import cli, launch
    from train.run_lock import RunLock

    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: pytest.fail("launched into a locked folder"))
    path, _ = _config(tmp_path, tmp_path / "out")
    args = cli.build_parser(["train.launch"]).parse_args(["train", str(path)])
    with RunLock(tmp_path / "out"):
        assert args.func(args) == launch.LOCKED_EXIT
    assert f"PID {os.getpid()} on host" in capsys.readouterr().err


# --- lineage -------------------------------------------------------------------------------------


def test_resume_auto_follows_the_lineage_not_the_highest_number(tmp_path, caplog):
    """The run resumed from checkpoint-4 after an abandoned branch reached checkpoint-10 (the old
    rule picked checkpoint-10): it continues from its own newest checkpoint, and the branch's
    leftovers are moved aside (rotation by number would otherwise delete this run's checkpoints)."""
    from train.lineage import plan_run, read_lineage, record_checkpoint, write_lineage

    out = tmp_path / "out"
    _, config = _config(tmp_path, out, resume="auto")
    for step in (2, 4, 10):
        _checkpoint(out, step)
    write_lineage(out, {"config": config_to_dict(config), "checkpoints": ["checkpoint-2"]})
    record_checkpoint(out, "checkpoint-4")
    assert read_lineage(out)["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    assert plan_run(config, apply=False).resume == str(out / "checkpoint-4")
    caplog.set_level(logging.INFO, logger="train.lineage")
    plan = plan_run(config, apply=True)
    assert plan.resume == str(out / "checkpoint-4") and plan.step == 4 and not plan.finished
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    (aside,) = tmp_path.glob("out.abandoned-*")
    assert [p.name for p in aside.iterdir()] == ["checkpoint-10"]
    assert "not part of this run" in caplog.text


def test_resume_from_a_path_starts_a_new_lineage_at_that_checkpoint(tmp_path):
    from train.lineage import plan_run, read_lineage, write_lineage

    out = tmp_path / "out"
    _, config = _config(tmp_path, out, resume="auto")
    for step in (2, 4, 6):
        _checkpoint(out, step)
    write_lineage(out, {"config": config_to_dict(config), "checkpoints": ["checkpoint-2", "checkpoint-4", "checkpoint-6"]})
    _, branch = _config(tmp_path, out, resume=str(out / "checkpoint-4"))
    assert plan_run(branch, apply=True).resume == str(out / "checkpoint-4")
    assert read_lineage(out)["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    assert plan_run(config, apply=False).resume == str(out / "checkpoint-4")  # auto now continues the branch


def test_a_fresh_run_into_a_used_folder_is_refused_unless_overwrite_moves_it_aside(tmp_path):
    from train.lineage import RunFolderRefused, plan_run, read_lineage

    out = tmp_path / "out"
    for step in (2, 4):
        _checkpoint(out, step)
    (out / "run_summary.json").write_text("{}")
    _, fresh = _config(tmp_path, out, resume=None)
    with pytest.raises(RunFolderRefused, match=r"holds another run's checkpoints \(checkpoint-2, checkpoint-4\).*"
                                               "overwrite_output_dir=true"):
        plan_run(fresh, apply=True)
    assert (out / "checkpoint-4").is_dir()  # nothing touched
    _, overwrite = _config(tmp_path, out, resume=None, overwrite_output_dir=True)
    assert plan_run(overwrite, apply=True).resume is None
    (aside,) = tmp_path.glob("out.previous-*")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-2", "checkpoint-4", "run_summary.json"]
    assert not list(out.glob("checkpoint-*")) and read_lineage(out)["checkpoints"] == []


def test_config_changes_on_resume_are_applied_or_refused_by_name(tmp_path, caplog):
    from train.lineage import RunFolderRefused, plan_run, write_lineage

    out = tmp_path / "out"
    _checkpoint(out, 4)
    _, first = _config(tmp_path, out, learning_rate=1.0e-3)
    write_lineage(out, {"config": config_to_dict(first), "checkpoints": ["checkpoint-4"]})
    _, lr = _config(tmp_path, out, learning_rate=2.0e-3, max_steps=20)
    with pytest.raises(RunFolderRefused, match=r"training\.learning_rate: 0\.001 -> 0\.002\. A resumed run keeps"):
        plan_run(lr, apply=True)
    _, longer = _config(tmp_path, out, learning_rate=1.0e-3, max_steps=20)
    caplog.set_level(logging.INFO, logger="train.lineage")
    assert plan_run(longer, apply=True).resume == str(out / "checkpoint-4")
    assert "resume: applying training.max_steps: 10 -> 20" in caplog.text
    # the memory and kernel settings change neither the optimizer state nor the data order
    _, memory = _config(tmp_path, out, learning_rate=1.0e-3, max_steps=20, activation_checkpointing="selective",
                        checkpointed_layers=1, activation_memory_gib=20.0, fused_kernels="none",
                        recompute_mlp_product=False, recompute_norm_outputs=False, fp8_mlp_activations=True,
                        triton_kernels=False)
    assert plan_run(memory, apply=False).resume == str(out / "checkpoint-4")


def test_a_kill_while_rotation_deletes_an_old_checkpoint_resumes_from_the_new_one(tmp_path, monkeypatch):
    """publish_in_lineage records checkpoint-4 before renaming it into place; the kill comes while
    keep_last=1 deletes checkpoint-2. `resume: auto` continues from checkpoint-4 (recorded after the
    rename, the lineage knew only checkpoint-2 and the new checkpoint would be moved aside as abandoned)."""
    from train import checkpoints
    from train.checkpoints import staging_dir
    from train.lineage import plan_run, publish_in_lineage, write_lineage

    out = tmp_path / "out"
    _, config = _config(tmp_path, out, resume="auto")
    _checkpoint(out, 2)
    write_lineage(out, {"config": config_to_dict(config), "checkpoints": ["checkpoint-2"]})
    staged = _checkpoint(staging_dir(out), 4)

    def killed(folder, run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "retire", killed)
    with pytest.raises(KeyboardInterrupt):
        publish_in_lineage(staged, out, keep_last=1)
    monkeypatch.undo()
    plan = plan_run(config, apply=True)
    assert plan.resume == str(out / "checkpoint-4") and plan.step == 4
    assert not list(tmp_path.glob("out.abandoned-*"))


def test_resuming_a_finished_run_launches_nothing(tmp_path, monkeypatch, capsys):
    """checkpoint-10 of a run with max_steps 10: `longvu train` says so and exits 0 without starting
    the ranks (the old behaviour trained one more step and wrote checkpoint-11)."""
    from train import cli, launch

    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: pytest.fail("a finished run was launched"))
    out = tmp_path / "out"
    _checkpoint(out, 10)
    path, _ = _config(tmp_path, out, resume="auto")
    args = cli.build_parser(["train.launch"]).parse_args(["train", str(path)])
    assert args.func(args) == 0
    assert "checkpoint-10 is at step 10, the configured end" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10"]


def test_longvu_train_refuses_a_fresh_run_into_a_used_folder(tmp_path, monkeypatch, capsys):
    from train import cli, launch

    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: pytest.fail("launched into a used folder"))
    out = tmp_path / "out"
    _checkpoint(out, 2)
    path, _ = _config(tmp_path, out, resume=None)
    args = cli.build_parser(["train.launch"]).parse_args(["train", str(path)])
    assert args.func(args) == 2
    assert "holds another run's checkpoints (checkpoint-2)" in capsys.readouterr().err


# --- SIGTERM before training ------------------------------------------------------------------------


def test_sigterm_before_training_raises_then_only_sets_the_flag():
    from train.signals import SigtermGuard, StoppedBeforeTraining

    guard, previous = SigtermGuard(), signal.getsignal(signal.SIGTERM)
    try:
        guard.install()
        with pytest.raises(StoppedBeforeTraining):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode
        guard.start_training()
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- bad-sample limit over the whole run ------------------------------------------------------------


def test_the_bad_fraction_limit_counts_the_run_before_a_resume():
    from data.bad_samples import BadSampleTracker, TooManyBadSamples
    from data.dataset import SkippedSample

    bad = SkippedSample(3, "r3", "missing_file", "file does not exist", "/x.mp4")
    fresh = BadSampleTracker(max_bad_fraction=0.1, min_samples=10)
    fresh.update(1, [bad], check=False)
    fresh.check(fresh.totals())  # 1 of 2: under min_samples, no verdict yet
    resumed = BadSampleTracker(max_bad_fraction=0.1, min_samples=10)
    resumed.restore({"seen": 20, "bad": 2, "by_code": {"missing_file": 2}})
    resumed.update(1, [bad], check=False)
    assert resumed.totals()["by_code"] == {"missing_file": 3}
    with pytest.raises(TooManyBadSamples, match=r"3 of 22 samples"):
        resumed.check(resumed.totals())
    # every rank's counts are summed, the restored ones added once
    assert resumed.totals([resumed.summary(), {"seen": 4, "bad": 1, "by_code": {"corrupt_video": 1}}]) == {
        "seen": 26, "bad": 4, "by_code": {"missing_file": 3, "corrupt_video": 1}, "steps_without_update": 0}


# --- the data position on another process count -------------------------------------------------------


@pytest.mark.parametrize("saved_world, steps_done, new_world", [(2, 2, 1), (2, 2, 3), (3, 1, 2), (2, 3, 3)])
def test_resuming_on_another_process_count_repeats_and_skips_no_batch(saved_world, steps_done, new_world):
    """Batches trained by `saved_world` ranks for `steps_done` steps, then by `new_world` ranks from
    the saved position to the end of the epoch: together, every batch of the epoch exactly once
    (apart from the documented padding, which repeats whole batches only at the epoch's end)."""
    from collections import Counter

    from data.sampler import ModalityLengthBatchSampler

    lengths, mods = [100] * 11, ["image"] * 5 + ["video"] * 6

    def ranks(world):
        return [ModalityLengthBatchSampler(lengths, mods, 4096, 1, seed=7, rank=r, world_size=world) for r in range(world)]

    epoch = [tuple(b) for b in ranks(1)[0].all_batches()]
    before = [tuple(b) for s in ranks(saved_world) for b in list(s)[:steps_done]]
    after = []
    for s in ranks(new_world):
        assert s.resume_at(0, steps_done * saved_world) == 0
        s.set_epoch(0)
        after += [tuple(b) for b in s]
    counts = Counter(before + after)
    assert set(counts) == set(epoch)  # nothing skipped
    padding = (-(len(epoch) - steps_done * saved_world)) % new_world
    assert sum(counts.values()) == len(epoch) + padding and all(c <= 2 for c in counts.values())
    assert {b for b, c in counts.items() if c == 2} == set(epoch[:padding])  # the padding only


def test_a_position_at_the_end_of_an_epoch_resumes_at_the_next():
    from data.sampler import ModalityLengthBatchSampler

    s = ModalityLengthBatchSampler([100] * 4, ["image"] * 4, 4096, 1, seed=1, rank=0, world_size=3)
    assert s.resume_at(2, 6) == 3  # 4 batches, padded to 6, all consumed
    s.set_epoch(3)
    assert len(s) == 2 and s.consumed == 0
