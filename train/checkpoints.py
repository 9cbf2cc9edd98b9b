"""A run directory's checkpoints, in one place: names, staging and rename, rotation, the LoRA connector
file, the newest complete checkpoint and resume resolution.

    RUN/checkpoint-N/          complete checkpoints (a folder only gets this name once complete)
    RUN/.staging/checkpoint-N/ a save in progress; removed at start-up, never resumed from
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
CONNECTOR_FILE = "non_lora_trainables.safetensors"  # LoRA checkpoints: the fully trained connector/projector
ADAPTER_FILE = "adapter_model.safetensors"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def staging_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / STAGING


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-N` folders of a run, oldest first (only complete ones exist under that name)."""
    root = Path(run_dir)
    found = [(int(m.group(1)), p) for p in root.glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def newest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def usual_file_modes(root: str | os.PathLike) -> None:
    """Give every file under `root` the mode a plain `open()` gives under the process umask (0644 with
    umask 022; executables keep their x bits): safetensors writes through a private temporary file (0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(root).rglob("*"):
        if path.is_file() and not path.is_symlink():
            executable = path.stat().st_mode & 0o111
            path.chmod((0o777 if executable else 0o666) & ~umask)


def publish_checkpoint(staged: Path, run_dir: str | os.PathLike, keep_last: int, keep: str | None = None) -> Path:
    """Rename a fully written `.staging/checkpoint-N` into the run folder (its files with the usual
    modes), then keep the last `keep_last` (and the checkpoint named `keep`, e.g. the best one by
    `training.eval.best_metric`)."""
    usual_file_modes(staged)
    final = Path(run_dir) / staged.name
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    if not any(staged.parent.iterdir()):
        staged.parent.rmdir()  # no empty `.staging/` left beside the checkpoints
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old)
    logger.info("checkpoint complete: %s", final)
    return final


def resolve_resume(resume, run_dir: str | os.PathLike) -> str | None:
    """`training.resume`: None/"none" -> start fresh; "auto" -> the run's newest complete checkpoint
    (None when there is none yet); a path -> that checkpoint, which must be complete."""
    if resume in (None, "", "none", False):
        return None
    if resume == "auto":
        newest = newest_checkpoint(run_dir)
        return str(newest) if newest else None
    if not Path(resume, "trainer_state.json").is_file():
        raise ValueError(f"training.resume={resume}: not a complete checkpoint (no trainer_state.json)")
    return str(resume)


def verify_adapter(checkpoint: Path) -> None:
    """Fail loudly if a saved LoRA adapter or connector file is missing or holds empty tensors (the ZeRO-3
    failure mode where partitioned parameters are written as placeholders)."""
    adapter = checkpoint / ADAPTER_FILE
    if not adapter.is_file():
        raise RuntimeError(f"{checkpoint}: no {ADAPTER_FILE} was written")
    for file in (adapter, checkpoint / CONNECTOR_FILE):
        tensors = load_file(str(file))
        empty = [k for k, v in tensors.items() if v.numel() == 0]
        if not tensors or empty:
            raise RuntimeError(f"{file}: empty tensors {empty[:5]} (ZeRO-3 parameters not gathered before saving)")
