"""Real `longvu train` runs (2 CPU processes, DeepSpeed, tiny model) under faults: two runs on one
output folder, SIGTERM during start-up. Helpers and data come from test_train."""

from __future__ import annotations

import os
import signal
import socket
import time

import psutil
import pytest

from test_train import ZERO2, Run, _check_checkpoint_dir, _config, _kill_group, _records, _write_manifest, media  # noqa: F401

pytestmark = pytest.mark.slow


def _wait_for(run: Run, text: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while text not in run.log:
        if run.proc.poll() is not None or time.time() > deadline:
            _kill_group(run.proc)
            pytest.fail(f"{text!r} never logged; log tail:\n{run.log[-4000:]}")
        time.sleep(0.05)


def test_two_runs_on_one_output_folder_one_fails_at_once_naming_the_holder(media, tmp_path):
    recs = _records(media)
    manifest = _write_manifest(media, "two_runs", [recs["image_0"], recs["video_0"]])
    cfg = _config(manifest, tmp_path / "out", zero=ZERO2, training={"max_steps": 2, "save_steps": 2})
    runs = [Run(cfg, tmp_path / name) for name in ("a", "b")]
    for run in runs:
        run.start()
    for run in runs:
        run.wait()
    winner, loser = sorted(runs, key=lambda r: r.returncode != 0)
    winner.check_ok()
    assert loser.returncode == 75, loser.log[-3000:]
    assert loser.seconds < 30  # refused before any rank started
    assert (f"another `longvu train` is using this output folder (PID {winner.proc.pid} on host "
            f"{socket.gethostname()}") in loser.log
    assert "launching:" not in loser.log
    assert [p.name for p in winner.out.glob("checkpoint-*")] == ["checkpoint-2"]
    _check_checkpoint_dir(winner.out / "checkpoint-2", zero3=False)
    assert winner.summary["global_step"] == 2
    assert (winner.out / ".run.lock").read_text() == ""  # released at the end


@pytest.mark.parametrize("when, target", [("launching:", "longvu"), ("trainable parameters", "longvu"),
                                          ("trainable parameters", "ranks")])
def test_sigterm_during_start_up_stops_with_a_named_status(media, tmp_path, when, target):
    """SIGTERM just after the launcher starts (ranks not yet running), or while the ranks load the
    model, to `longvu train` or to the ranks themselves: every process stops, the status is 143
    with a log line saying why, nothing is saved. (Before: a SIGTERM before the ranks existed was
    lost and the run trained on; one during start-up trained a step and saved it; one in the first
    second of a rank's life killed it and the launcher exited 241.)"""
    recs = _records(media)
    manifest = _write_manifest(media, "sigterm_start", [recs["image_0"], recs["video_0"]])
    cfg = _config(manifest, tmp_path / "out", zero=ZERO2, training={"max_steps": 50, "save_steps": 1})
    run = Run(cfg, tmp_path)
    run.start()
    _wait_for(run, when)
    procs = psutil.Process(run.proc.pid).children(recursive=True) + [psutil.Process(run.proc.pid)]
    if target == "ranks":
        ranks = [p for p in procs if any(a.startswith("--local_rank") for a in p.cmdline())]
        assert len(ranks) == 2
        for p in ranks:
            p.send_signal(signal.SIGTERM)
    else:
        run.proc.send_signal(signal.SIGTERM)
    run.wait(timeout=120)
    assert run.returncode == 143, f"exit {run.returncode}; log tail:\n{run.log[-4000:]}"
    if target == "longvu":
        assert "stopped by SIGTERM" in run.log or "SIGTERM before the ranks started" in run.log, run.log[-4000:]
    else:
        assert "SIGTERM during start-up (before step 1): stopping" in run.log, run.log[-4000:]
    assert not list(run.out.glob("checkpoint-*")) and not (run.out / "run_summary.json").exists()
    for p in procs:  # nothing of the run is left running
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, p
