"""`training.profile_steps: N`: torch.profiler over N training steps of each rank, from this process's
step `training.profile_from_step` on (the step before is the profiler's warm-up).

Writes `<output_dir>/profile/rank<R>.trace.json` (a Chrome trace: chrome://tracing or Perfetto) and
`rank<R>.summary.txt`: the LongVU regions (`longvu/vision`, `longvu/dino`, `longvu/siglip`,
`longvu/connector`, `longvu/llm`, `longvu/loss`: forward passes; backward work is listed under autograd)
with their CPU and GPU time per recorded step, then the ops that took most time themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

REGION_PREFIX = "longvu/"
TOP_OPS = 30


class StepProfiler(TrainerCallback):
    """Records steps first_step .. first_step + steps - 1 (1-based, counted in this process)."""

    def __init__(self, out_dir: Path, rank: int, first_step: int, steps: int):
        if first_step < 2 or steps < 1:
            raise ValueError(f"profile from step {first_step} for {steps} steps: needs first_step >= 2, steps >= 1")
        self.out_dir, self.rank, self.first_step, self.steps = Path(out_dir), rank, first_step, steps
        self.gpu = torch.cuda.is_available()
        self.profiler = None
        self.steps_seen = 0
        self.wrote = False

    def on_train_begin(self, args, state, control, **kwargs):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.gpu else [])
        self.profiler = profile(activities=activities, on_trace_ready=self._write,
                                schedule=schedule(skip_first=self.first_step - 2, wait=0, warmup=1,
                                                  active=self.steps, repeat=1))
        self.profiler.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_seen += 1
        self.profiler.step()

    def on_train_end(self, args, state, control, **kwargs):
        self.profiler.stop()
        if not self.wrote:
            logger.warning("training.profile_steps: this process ran %d steps, fewer than the %d needed to record "
                           "from step %d; no profile written", self.steps_seen, self.first_step, self.first_step)

    def _write(self, prof) -> None:
        recorded = min(self.steps, self.steps_seen - self.first_step + 1)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"rank{self.rank}.trace.json"
        prof.export_chrome_trace(str(trace))
        summary = self.out_dir / f"rank{self.rank}.summary.txt"
        summary.write_text(summary_text(prof.key_averages(), recorded, self.first_step, self.gpu))
        self.wrote = True
        logger.info("profiled steps %d-%d: %s, %s", self.first_step, self.first_step + recorded - 1, trace, summary)


def summary_text(events, steps: int, first_step: int, gpu: bool) -> str:
    """The regions table (ms per step) and the top ops by their own time, from `key_averages()`."""
    per_step = lambda us: us / 1e3 / max(1, steps)  # noqa: E731
    lines = [f"steps {first_step}-{first_step + steps - 1} ({steps} recorded); ms per step",
             "", f"{'region':<24} {'calls':>6} {'CPU ms':>10} {'GPU ms':>10}"]
    for e in sorted((e for e in events if e.key.startswith(REGION_PREFIX)), key=lambda e: -e.cpu_time_total):
        gpu_ms = f"{per_step(e.device_time_total):10.1f}" if gpu else f"{'-':>10}"
        lines.append(f"{e.key:<24} {e.count // max(1, steps):>6} {per_step(e.cpu_time_total):10.1f} {gpu_ms}")
    own = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    lines += ["", f"top {TOP_OPS} ops by their own {'GPU' if gpu else 'CPU'} time", f"{'ms':>10} {'calls':>7}  op"]
    ops = (e for e in events if not e.key.startswith((REGION_PREFIX, "ProfilerStep")))
    for e in sorted(ops, key=lambda e: -own(e))[:TOP_OPS]:
        lines.append(f"{per_step(own(e)):10.2f} {e.count // max(1, steps):>7}  {e.key[:120]}")
    return "\n".join(lines) + "\n"
