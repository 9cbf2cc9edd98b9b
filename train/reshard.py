"""Resuming a DeepSpeed ZeRO checkpoint on another number of processes.

ZeRO-2/3 optimizer states (and ZeRO-3 weights) are split per rank, so a checkpoint saved by N ranks
cannot be loaded by M directly. `universal_view` converts its DeepSpeed states into DeepSpeed's
universal layout (one folder per parameter: fp32 weights and Adam moments, whole), which the engine
re-partitions over any number of ranks when started with `checkpoint.load_universal`. The result is
a folder beside the checkpoint, `RUN/.reshard/checkpoint-N/`, holding links to the checkpoint's own
files plus `GLOBAL_STEP_universal/` and `latest_universal`; the checkpoint itself is left untouched.
The data position is mapped by the sampler (`data.sampler`), not here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
from pathlib import Path

from train.checkpoints import DATA_POSITION_FILE

logger = logging.getLogger(__name__)

RESHARD_DIR = ".reshard"


def saved_world_size(checkpoint: str | Path) -> int | None:
    """The number of processes that wrote `checkpoint` (None for checkpoints that do not record it)."""
    path = Path(checkpoint) / DATA_POSITION_FILE
    return int(json.loads(path.read_text())["world_size"]) if path.is_file() else None


def universal_view(checkpoint: str | Path, run_dir: str | Path) -> Path:
    """Write `RUN/.reshard/checkpoint-N/` (see the module docstring) -> its path. Rank 0 only."""
    from deepspeed.checkpoint import ds_to_universal

    checkpoint = Path(checkpoint).resolve()
    tag = (checkpoint / "latest").read_text().strip()
    view = Path(run_dir) / RESHARD_DIR / checkpoint.name
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for entry in checkpoint.iterdir():
        (view / entry.name).symlink_to(entry)
    args = argparse.Namespace(input_folder=str(checkpoint / tag), output_folder=str(view / f"{tag}_universal"),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress report, not ours
        ds_to_universal.main(args)
    (view / "latest_universal").write_text(f"{tag}_universal")
    logger.info("%s: DeepSpeed states converted to the universal layout in %s", checkpoint, view)
    return view
