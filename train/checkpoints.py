"""A run directory's checkpoints, in one place: names, staging and rename, rotation, the LoRA connector
file, the newest complete checkpoint, resume resolution, manifests and free space.

    RUN/checkpoint-N/          complete checkpoints (a folder only gets this name once complete), each
                               with MANIFEST.json (size + sha256 of its files, train.integrity)
    RUN/.staging/checkpoint-N/ a save in progress; removed at start-up, never resumed from
    RUN/.staging/retired-*     a checkpoint being deleted (rotation, replacement); removed at start-up

A kill at any moment leaves each `checkpoint-N` complete or absent: a folder gets the name by one
rename once written, and leaves it by one rename before it is deleted.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file

from longvu.durable import replace_durably
from train.integrity import MANIFEST, excluded, read_manifest, verify_files, write_manifest
from train.safe_load import CheckpointError, check_pickles, pickle_files

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
CONNECTOR_FILE = "non_lora_trainables.safetensors"  # LoRA checkpoints: the fully trained connector/projector
ADAPTER_FILE = "adapter_model.safetensors"
DATA_POSITION_FILE = "data_position.json"  # epoch, batches consumed in it (all ranks), world size
BAD_SAMPLES_FILE = "bad_samples.json"  # the run's bad-sample counts up to this checkpoint, over all ranks


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


def retire(folder: Path, run_dir: str | os.PathLike) -> None:
    """Delete a checkpoint folder: first renamed out of its name (into `.staging/`), then removed."""
    trash = staging_dir(run_dir)
    trash.mkdir(exist_ok=True)
    aside = trash / f"retired-{folder.name}-{os.getpid()}"
    os.replace(folder, aside)
    shutil.rmtree(aside)


def process_umask() -> int:
    """The process umask, read without changing it where Linux reports it (/proc/self/status); else
    set and restored at once (a file another thread creates in between would get it unmasked)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def usual_file_modes(root: str | os.PathLike) -> None:
    """Give every file under `root` the mode a plain `open()` gives under the process umask (0644 with
    umask 022; executables keep their x bits): safetensors writes through a private temporary file (0600)."""
    umask = process_umask()
    for path in Path(root).rglob("*"):
        if path.is_file() and not path.is_symlink():
            executable = path.stat().st_mode & 0o111
            path.chmod((0o777 if executable else 0o666) & ~umask)


def publish_checkpoint(staged: Path, run_dir: str | os.PathLike, keep_last: int, keep: str | None = None) -> Path:
    """Record the manifest of a fully written `.staging/checkpoint-N` (its files with the usual modes),
    rename it into the run folder once flushed to disk (longvu.durable), then keep the last `keep_last`
    (and the checkpoint named `keep`, e.g. the best one by `training.eval.best_metric`)."""
    usual_file_modes(staged)
    write_manifest(staged)
    final = Path(run_dir) / staged.name
    if final.exists():
        retire(final, run_dir)
    replace_durably(staged, final)
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        if old.name != keep:
            retire(old, run_dir)
    if not any(staged.parent.iterdir()):
        staged.parent.rmdir()  # no empty `.staging/` left beside the checkpoints
    logger.info("checkpoint complete: %s", final)
    return final


def checkpoint_bytes(checkpoint: Path) -> int:
    """Bytes of a checkpoint's files (from its manifest when it has one)."""
    recorded = read_manifest(checkpoint)
    if recorded is not None:
        return sum(entry["size"] for entry in recorded.values())
    return sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())


def warn_if_low_space(run_dir: str | os.PathLike) -> str | None:
    """Before a save: a warning (logged and returned) when the run folder's file system has less free
    space than the newest checkpoint took; None when it has enough, or there is no checkpoint yet."""
    newest = newest_checkpoint(run_dir)
    if newest is None:
        return None
    need, free = checkpoint_bytes(newest), shutil.disk_usage(run_dir).free
    if free >= need:
        return None
    message = (f"{run_dir}: {free / 2**30:.2f} GiB free, the last checkpoint ({newest.name}) took "
               f"{need / 2**30:.2f} GiB: the next save will probably fail (No space left on device)")
    logger.warning(message)
    return message


class CheckpointSaveError(RuntimeError):
    """A save that failed; its staged files are removed, the previous checkpoints are kept."""


def abandon_save(staged: Path, run_dir: str | os.PathLike, err: OSError) -> CheckpointSaveError:
    """After a failed save: remove its `.staging` leftovers -> the error to raise, naming the path."""
    shutil.rmtree(staged, ignore_errors=True)
    with_name = err.filename or staged
    reason = "No space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    kept = newest_checkpoint(run_dir)
    return CheckpointSaveError(f"{with_name}: {reason}; saving {staged.name} failed, its partial files "
                               f"were removed; {'kept ' + str(kept) if kept else 'no earlier checkpoint'}")


def deepspeed_state(checkpoint: Path) -> tuple[str, ...]:
    """The names of a checkpoint's DeepSpeed state: `latest` and its `global_step*` folders."""
    return ("latest", *sorted(p.name for p in checkpoint.glob("global_step*")))


def verify_checkpoint(checkpoint: str | os.PathLike, share: tuple[int, int] = (0, 1),
                      exclude: tuple[str, ...] = ()) -> None:
    """Before using a checkpoint (resume, export): its files match its MANIFEST.json, and every pickle in
    it loads weights-only; CheckpointError naming the first file that does not. `share=(i, n)`: hash and
    check every n-th file from the i-th (one share per rank); `exclude`: files or folders not to be used."""
    checkpoint = Path(checkpoint)
    recorded = read_manifest(checkpoint)
    if recorded is None:
        logger.warning("%s: no %s: file integrity not checked", checkpoint, MANIFEST)
    else:
        verify_files(checkpoint, recorded, exclude=(MANIFEST, *exclude), share=share)
    pickles = [p for p in pickle_files(checkpoint) if not excluded(p.relative_to(checkpoint).as_posix(), exclude)]
    check_pickles(checkpoint, pickles[share[0]::share[1]])


def verify_on_ranks(checkpoint: str | os.PathLike) -> None:
    """`verify_checkpoint`, each rank of a distributed run checking its share of the files; every rank
    raises the same CheckpointError when any share fails."""
    import torch.distributed as dist

    ranked = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ranked else (0, 1)
    try:
        verify_checkpoint(checkpoint, share=(rank, world))
        problem = None
    except CheckpointError as err:
        problem = str(err)
    if ranked:
        problems = [None] * world
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise CheckpointError(problem)


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
