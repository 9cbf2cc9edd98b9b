"""`training.profile_steps` (train/profiling.py): which steps get recorded and what is written; the
end-to-end run with the LongVU regions is in test_train_logging."""

import json
import logging

import torch
from torch.profiler import record_function

from train.profiling import StepProfiler


def _steps(profiler: StepProfiler, n: int) -> None:
    profiler.on_train_begin(None, None, None)
    for step in range(1, n + 1):
        with record_function(f"longvu/step{step}"):  # a region named after its step
            torch.randn(64, 64) @ torch.randn(64, 64)
        profiler.on_step_end(None, None, None)
    profiler.on_train_end(None, None, None)


def test_only_the_configured_steps_are_recorded(tmp_path):
    profiler = StepProfiler(tmp_path / "profile", 3, first_step=3, steps=2)
    _steps(profiler, 6)
    summary = (tmp_path / "profile" / "rank3.summary.txt").read_text()
    assert summary.startswith("steps 3-4 (2 recorded)")
    assert "longvu/step3" in summary and "longvu/step4" in summary
    assert "longvu/step2" not in summary and "longvu/step5" not in summary  # warm-up and after: not recorded
    names = {e.get("name") for e in json.loads((tmp_path / "profile" / "rank3.trace.json").read_text())["traceEvents"]}
    assert {"longvu/step3", "longvu/step4"} <= names and "longvu/step5" not in names


def test_a_run_shorter_than_the_window_writes_what_it_recorded_or_says_why_not(tmp_path, caplog):
    partial = StepProfiler(tmp_path / "a", 0, first_step=2, steps=5)
    _steps(partial, 3)
    assert (tmp_path / "a" / "rank0.summary.txt").read_text().startswith("steps 2-3 (2 recorded)")
    short = StepProfiler(tmp_path / "b", 0, first_step=4, steps=1)
    with caplog.at_level(logging.WARNING, logger="train.profiling"):
        _steps(short, 2)
    assert not (tmp_path / "b").exists()
    assert "this process ran 2 steps, fewer than the 4 needed to record from step 4; no profile written" in caplog.text
