"""A run folder's history (`RUN/lineage.json`) and what a new `longvu train` into it may do.

    {"config": <the run config in effect>, "checkpoints": ["checkpoint-2", ...], "resumed_from": PATH}

The checkpoint list is this run's own line of descent, oldest first: `resume: auto` continues from
its newest complete entry, never from a higher-numbered checkpoint an abandoned branch left behind
(such leftovers, numbered after the resume point, are moved aside so that rotation by number keeps
this run's checkpoints). A fresh run (`resume: null`) into a folder that holds checkpoints is refused
unless `training.overwrite_output_dir` moves the old run aside. On resume the new config is compared
with the recorded one: the keys in `APPLIED_ON_RESUME` take effect (logged), any other change is
refused, since the checkpoint's optimizer, schedule and data order would silently override it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from train.checkpoints import CHECKPOINT_RE, complete_checkpoints, publish_checkpoint
from train.config import RunConfig, config_to_dict
from longvu.durable import write_text_durably
from train.run_lock import LOCK_FILE

logger = logging.getLogger(__name__)

LINEAGE_FILE = "lineage.json"

# Settings a resumed run applies; a change to any other key is refused.
APPLIED_ON_RESUME = (
    "training.max_steps", "training.num_train_epochs", "training.save_steps", "training.save_at_end",
    "training.keep_last", "training.logging_steps", "training.profile_steps", "training.profile_from_step",
    "training.report_to", "training.run_name",
    "training.resume", "training.overwrite_output_dir", "training.activation_checkpointing",
    "training.checkpointed_layers", "training.activation_memory_gib", "training.gpu_memory_gib",
    "training.fused_kernels", "training.triton_kernels", "training.recompute_mlp_product", "training.recompute_norm_outputs",
    "training.fp8_mlp_activations",
    "training.compile_towers", "training.fp8_towers", "training.max_grad_norm", "training.output_dir",
    "data.num_workers", "data.prefetch_factor", "data.decode_timeout_s", "data.max_bad_fraction", "data.bad_min_samples", "launch.",
)


class RunFolderRefused(ValueError):
    """This run cannot start in its output folder as configured (the message says why and what to do)."""


@dataclass
class RunPlan:
    resume: str | None  # the checkpoint to resume from; None: start fresh
    finished: bool = False  # the checkpoint already reached the configured end: nothing to train
    step: int = 0  # the checkpoint's global step


def read_lineage(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunFolderRefused(f"{path}: unreadable ({err}); remove it to resume from the newest checkpoint") from err


def write_lineage(run_dir: str | os.PathLike, lineage: dict) -> None:
    write_text_durably(Path(run_dir) / LINEAGE_FILE, json.dumps(lineage, indent=2))


def publish_in_lineage(staged: Path, run_dir: str | os.PathLike, keep_last: int, keep: str | None = None) -> Path:
    """Record a fully written `.staging/checkpoint-N` in the lineage, then publish it (rename, rotation;
    `train.checkpoints.publish_checkpoint`). Recorded first, a kill after the rename (e.g. while rotation
    deletes an old checkpoint) finds it in the lineage; until the rename `resume: auto` skips it as absent."""
    record_checkpoint(run_dir, staged.name)
    return publish_checkpoint(staged, run_dir, keep_last, keep)


def record_checkpoint(run_dir: str | os.PathLike, name: str) -> None:
    """Append a checkpoint to the lineage, dropping entries rotation has deleted."""
    lineage = read_lineage(run_dir) or {"checkpoints": []}
    kept = [c for c in lineage.get("checkpoints", []) if c != name and (Path(run_dir) / c).is_dir()]
    write_lineage(run_dir, {**lineage, "checkpoints": kept + [name]})


def _step(checkpoint: Path) -> int:
    m = CHECKPOINT_RE.match(checkpoint.name)
    return int(m.group(1)) if m else -1


def _lineage_newest(run_dir: Path, lineage: dict | None) -> Path | None:
    """The newest complete checkpoint of the recorded lineage, or (no lineage recorded) by number."""
    if lineage is None:
        found = complete_checkpoints(run_dir)
        if found:
            logger.info("%s: no %s recorded; resuming from the highest-numbered checkpoint", run_dir, LINEAGE_FILE)
        return found[-1] if found else None
    for name in reversed(lineage.get("checkpoints", [])):
        if (run_dir / name / "trainer_state.json").is_file():
            return run_dir / name
    if lineage.get("checkpoints"):
        raise RunFolderRefused(f"{run_dir}: none of this run's checkpoints {lineage['checkpoints']} is complete "
                               "any more; name one with training.resume=PATH or start fresh (training.resume=null)")
    return None


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value and key != "overrides":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(recorded: dict, new: dict) -> tuple[list[str], list[str]]:
    """(applied, refused) changes between two config dicts, each as 'key: old -> new'."""
    old, cur = _flat(recorded), _flat(new)
    applied, refused = [], []
    for key in sorted(set(old) | set(cur)):
        if old.get(key) != cur.get(key):
            line = f"{key}: {old.get(key)!r} -> {cur.get(key)!r}"
            (applied if key.startswith(APPLIED_ON_RESUME) else refused).append(line)
    return applied, refused


def _finished(checkpoint: Path, config: RunConfig) -> tuple[bool, int]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    step, t = int(state.get("global_step", 0)), config.training
    if t.max_steps > 0:
        return step >= t.max_steps, step
    return float(state.get("epoch") or 0) >= t.num_train_epochs, step


def _move_aside(run_dir: Path, names: list[str], why: str) -> Path:
    """Move entries of the run folder into a sibling `RUN.WHY-TIME/` (nothing is deleted)."""
    aside = run_dir.with_name(f"{run_dir.name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}")
    aside.mkdir()
    for name in names:
        os.replace(run_dir / name, aside / name)
    return aside


def plan_run(config: RunConfig, apply: bool) -> RunPlan:
    """Decide where this run starts; with `apply` (the one process holding the run lock) also record
    it: refuse, move an old run or an abandoned branch aside, write the lineage. Raises RunFolderRefused."""
    from train.checkpoints import resolve_resume

    t = config.training
    run_dir = Path(t.output_dir)
    lineage = read_lineage(run_dir)
    if t.resume == "auto":
        checkpoint = _lineage_newest(run_dir, lineage)
    else:
        try:
            resume = resolve_resume(t.resume, run_dir)
        except ValueError as err:
            raise RunFolderRefused(str(err)) from err
        checkpoint = Path(resume) if resume else None
    if checkpoint is None:
        existing = complete_checkpoints(run_dir)
        if existing:
            if not t.overwrite_output_dir:
                raise RunFolderRefused(
                    f"{run_dir} holds another run's checkpoints ({', '.join(p.name for p in existing)}); resume "
                    "it with training.resume=auto, or set training.overwrite_output_dir=true to move it aside")
            if apply:
                names = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
                logger.warning("training.overwrite_output_dir: the previous run in %s moved to %s", run_dir,
                               _move_aside(run_dir, names, "previous"))
        if apply:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_lineage(run_dir, {"config": config_to_dict(config), "checkpoints": []})
        return RunPlan(None)

    source = read_lineage(checkpoint.parent) if checkpoint.parent.resolve() != run_dir.resolve() else lineage
    if source and "config" in source:
        applied, refused = config_changes(source["config"], config_to_dict(config))
        if refused:
            raise RunFolderRefused(
                f"resuming {checkpoint}: changed since the checkpoint was written: {'; '.join(refused)}. A resumed "
                "run keeps the checkpoint's optimizer, schedule and data order, so these would not take effect: "
                "revert them, or start a new run in another training.output_dir")
        for line in applied:
            logger.info("resume: applying %s", line)
    finished, step = _finished(checkpoint, config)
    if apply:
        same_folder = checkpoint.parent.resolve() == run_dir.resolve()
        later = [p.name for p in complete_checkpoints(run_dir) if _step(p) > step] if same_folder else []
        if later:
            logger.warning("%s: checkpoints after the resume point %s are not part of this run: moved to %s",
                           run_dir, checkpoint.name, _move_aside(run_dir, later, "abandoned"))
        ancestors = (source or {}).get("checkpoints") or [p.name for p in complete_checkpoints(checkpoint.parent)]
        history = ancestors[: ancestors.index(checkpoint.name) + 1] if checkpoint.name in ancestors else []
        record = {"config": config_to_dict(config), "checkpoints": history if same_folder else []}
        if not same_folder:
            record["resumed_from"] = str(checkpoint)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_lineage(run_dir, record)
    return RunPlan(str(checkpoint), finished, step)
