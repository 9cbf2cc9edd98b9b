"""Real `longvu train` runs (2 CPU processes, DeepSpeed, tiny model) under faults: two runs on one
output folder, SIGTERM during start-up. Helpers and data come from test_train."""

from __future__ import annotations

import os
import signal
import socket
import time

import psutil
import pytest

from test_train import (ZERO2, Run, _check_checkpoint_dir, _config, _kill_group, _records, _write_manifest,  # noqa: F401
                        media, train_zero3_main)


@pytest.fixture(scope="module")
def zero3_main(media, tmp_path_factory):
    """The main ZeRO-3 run with fp32 AdamW, whose moments re-partition onto other process counts."""
    return train_zero3_main(media, tmp_path_factory, "adamw")

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
    start = time.perf_counter()
    while all(run.proc.poll() is None for run in runs):
        assert time.perf_counter() - start < 120, "neither run was refused"
        time.sleep(0.1)
    first = next(run for run in runs if run.proc.poll() is not None)
    first_s = time.perf_counter() - start
    for run in runs:
        run.wait()
    winner, loser = sorted(runs, key=lambda r: r.returncode != 0)
    winner.check_ok()
    assert loser.returncode == 75, loser.log[-3000:]
    assert first is loser and first_s < winner.seconds / 2  # refused before any rank started
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


# --- bad samples across ranks and resumes ------------------------------------------------------------


def _bad_schedule(seed: int, epochs: int) -> list[tuple[str, str]]:
    """Per step, (rank 0, rank 1)'s batch kind, recomputed with the run's sampler: records
    [image, video, bad, bad]; an unreadable record is probed as modality "unknown", length 1 (the
    other groups hold one record each, so their lengths do not change the order)."""
    from data.sampler import ModalityLengthBatchSampler

    mods = ["image", "video", "unknown", "unknown"]
    steps = []
    for epoch in range(epochs):
        sampler = ModalityLengthBatchSampler([100, 100, 1, 1], mods, 4096, 1, seed=seed)
        sampler.set_epoch(epoch)
        kinds = ["bad" if mods[b[0]] == "unknown" else "good" for b in sampler]
        steps += list(zip(kinds[0::2], kinds[1::2]))
    return steps


BAD_STEPS = 4


@pytest.fixture(scope="module")
def bad_run(media, tmp_path_factory):
    """ZeRO-2, 2 ranks, one good image, one good clip and two records whose video is missing; a seed
    whose first step has a good sample and a later step has only bad ones, on both ranks."""
    recs = _records(media)
    conv = recs["image_0"]["conversations"]
    bad = [{"id": f"bad_{i}", "video": f"missing_{i}.mp4", "conversations": conv} for i in range(2)]
    manifest = _write_manifest(media, "bad", [recs["image_0"], recs["video_0"], *bad])
    seed = next(s for s in range(200) if "good" in (sched := _bad_schedule(s, 2))[0]
                and ("bad", "bad") in sched[1:BAD_STEPS])
    work = tmp_path_factory.mktemp("bad_run")
    cfg = _config(manifest, work / "out", zero=ZERO2, training={
        "max_steps": BAD_STEPS, "save_steps": 1, "keep_last": 10, "seed": seed},
        data={"max_bad_fraction": 0.9, "bad_min_samples": 1})
    run = Run(cfg, work).run().check_ok()
    run.schedule = _bad_schedule(seed, 2)[:BAD_STEPS]
    return run


def test_bad_samples_are_summed_over_ranks_and_an_all_bad_step_makes_no_update(bad_run):
    from safetensors.torch import load_file
    import torch

    run, schedule = bad_run, bad_run.schedule
    expected_bad = sum(kind == "bad" for step in schedule for kind in step)
    counts = run.summary["bad_samples"]
    assert counts["seen"] == 2 * BAD_STEPS and counts["bad"] == expected_bad  # both ranks, not rank 0's
    assert counts["by_code"] == {"missing_file": expected_bad}
    all_bad = [i + 1 for i, step in enumerate(schedule) if step == ("bad", "bad")]
    assert counts["steps_without_update"] == len(all_bad)
    weights = {s: load_file(str(run.out / f"checkpoint-{s}" / "model.safetensors")) for s in range(1, BAD_STEPS + 1)}
    for step in range(2, BAD_STEPS + 1):
        same = all(torch.equal(weights[step][k], weights[step - 1][k]) for k in weights[step])
        assert same == (step in all_bad), (step, schedule)  # Adam's momentum would move them otherwise
    for step in all_bad:
        assert f"step {step}: every sample of the batch was bad on every rank: no optimizer step" in run.log


def test_bad_sample_counts_survive_a_resume(bad_run, tmp_path):
    """Resumed from checkpoint-2, the run's counts are those of the straight run (the checkpoint
    carries steps 1-2's counts of both ranks), and it reaches the same weights."""
    import json
    import shutil

    from safetensors.torch import load_file
    import torch

    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(bad_run.out / "checkpoint-2", out / "checkpoint-2")
    saved = json.loads((out / "checkpoint-2" / "bad_samples.json").read_text())
    assert saved["seen"] == 4 and saved["bad"] == sum(k == "bad" for s in bad_run.schedule[:2] for k in s)
    cfg = json.loads(json.dumps(bad_run.cfg))
    cfg["training"]["output_dir"] = str(out)
    resumed = Run(cfg, tmp_path).run().check_ok()
    assert resumed.summary["bad_samples"] == bad_run.summary["bad_samples"]
    a = load_file(str(bad_run.out / f"checkpoint-{BAD_STEPS}" / "model.safetensors"))
    b = load_file(str(out / f"checkpoint-{BAD_STEPS}" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- resume on another process count ----------------------------------------------------------------


@pytest.fixture(scope="module", params=[1, 3])
def resharded(request, zero3_main, tmp_path_factory):
    """The ZeRO-3 main run's checkpoint-2 (2 processes; 6 records, batch size 1: 4 of epoch 0's 6
    batches consumed) resumed with 1 process (2 accumulation steps, so each step trains the same 2
    batches as the 2-process run) or with 3."""
    import json
    import shutil

    nproc = request.param
    straight = zero3_main.check_ok()
    work = tmp_path_factory.mktemp(f"resharded_{nproc}")
    shutil.copytree(straight.out / "checkpoint-2", work / "out" / "checkpoint-2")
    cfg = json.loads(json.dumps(straight.cfg))
    cfg["training"]["output_dir"] = str(work / "out")
    cfg["training"]["gradient_accumulation_steps"] = 2 if nproc == 1 else 1
    run = Run(cfg, work, overrides=(f"launch.nproc={nproc}",)).run().check_ok()
    run.nproc = nproc
    return run


def test_a_zero3_run_saved_on_2_processes_resumes_on_1_and_3(resharded, zero3_main):
    import json

    from safetensors.torch import load_file
    import torch

    run, nproc = resharded, resharded.nproc
    assert f"was saved by 2 processes; resuming on {nproc}: re-partitioning" in run.log
    assert run.summary["global_step"] == 4 and not (run.out / ".reshard").exists()
    losses = run.losses()
    assert sorted(losses) == [1, 2, 3, 4] and all(v == v for v in losses.values())
    # the data continues where the 2 processes stopped: 4 of epoch 0's 6 batches were consumed, so
    # step 3 takes the other 2 (3 processes: plus 1 repeat of the epoch's first, the padding) and
    # step 4 opens epoch 1 with one batch per process and accumulation step
    position = json.loads((run.out / "checkpoint-4" / "data_position.json").read_text())
    assert position == {"epoch": 1, "consumed": 2 if nproc == 1 else 3, "world_size": nproc}
    assert run.summary["bad_samples"]["seen"] == 2 * 2 + (2 + 2 if nproc == 1 else 3 + 3)
    if nproc == 1:
        # the same batches per step as the straight run (2 accumulation steps): step 3 sees the same
        # weights and data, so the same loss and gradient norm (to float rounding: one process gets both
        # cores' threads, so matmul sums run in another order) and the same learning rates, exactly
        straight = {h["step"]: h for h in zero3_main.summary["log_history"] if "loss" in h}
        resumed = {h["step"]: h for h in run.summary["log_history"] if "loss" in h}
        for key in ("loss", "grad_norm"):
            assert resumed[3][key] == pytest.approx(straight[3][key], rel=1e-5), key
        def rates(h):  # per group, by name (a universal load returns the groups unnamed)
            return {k: v for k, v in h.items() if k.startswith("lr/")}

        assert {"lr/connector", "lr/projector"} <= set(rates(straight[3]))
        assert rates(resumed[3]) == rates(straight[3])
        assert resumed[3]["frames_in_per_sample"] == straight[3]["frames_in_per_sample"]
        # the optimizer state comes back through DeepSpeed's universal checkpoint, whose ZeRO-3
        # restore moves the next updates slightly off the native resume's (measured: <= 3e-4 per
        # weight after steps 3-4 at lr <= 7.5e-4, the same with 2 processes; cause not found)
        a = load_file(str(zero3_main.out / "checkpoint-4" / "model.safetensors"))
        b = load_file(str(run.out / "checkpoint-4" / "model.safetensors"))
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
