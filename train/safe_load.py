"""Loading pickled checkpoint files (`*.pt`, `*.pth`, `*.bin`) without running code from them.

Every such load goes through `torch.load(weights_only=True)`: tensors, containers, numbers and the few
classes DeepSpeed's and the Trainer's states hold (`SAFE_GLOBALS`, and `OPTIONAL_SAFE_GLOBALS` of
optional libraries, imported when a file needs one). A file that needs anything else is
refused with `UnsafeCheckpointError` naming the file and the global, before any of its code can run.

- `safe_torch_load(file)`: one load.
- `safe_loading()`: a context in which every `torch.load` call (DeepSpeed's checkpoint engine and
  `zero_to_fp32`, which pass `weights_only=False`; the Trainer; peft; transformers) is such a load.
- `check_pickles(folder)`: every pickle file of a checkpoint loaded weights-only with its tensor data
  memory-mapped, not read: a refusal before any work, at the cost of the pickles' metadata.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")

# module.name of the non-tensor classes in the states DeepSpeed (ZeRO-2/3 optimizer and model states)
# and the HF Trainer (rng_state*.pth: numpy arrays) write
SAFE_GLOBALS = (
    "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
)

# the same for optional libraries, imported only when a file names one: torchao's 8-bit optimizer moments
# (training.optimizer: adamw_8bit)
OPTIONAL_SAFE_GLOBALS = ("torchao.optim.subclass_8bit.OptimState8bit",)


class CheckpointError(ValueError):
    """A checkpoint file that must not be used; the message names the file and the reason."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that needs more than a weights-only load allows."""


def _resolve(qualname: str):
    import importlib

    module, _, name = qualname.rpartition(".")
    try:
        obj = importlib.import_module(module)
    except ImportError:
        return None
    return getattr(obj, name, None)


@functools.lru_cache(maxsize=1)
def safe_globals() -> list:
    """The allow-listed classes and functions of `SAFE_GLOBALS` that exist in this environment."""
    return [obj for obj in map(_resolve, SAFE_GLOBALS) if obj is not None]


_GLOBAL_RE = re.compile(r"GLOBAL (\S+)")


def _refusal(file, err: Exception) -> UnsafeCheckpointError:
    match = _GLOBAL_RE.search(str(err))
    if match:
        return UnsafeCheckpointError(f"{file}: refused: loading it would need the global {match.group(1)}, which a "
                                     "weights-only load does not allow (the file may have been tampered with)")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = lines[-2] if len(lines) > 2 else (lines or [repr(err)])[-1]  # torch wraps it in two paragraphs
    return UnsafeCheckpointError(f"{file}: refused by the weights-only loader ({reason}): not a plain "
                                 "tensor checkpoint (corrupted or tampered with)")


def _load(original, file, map_location=None, mmap: bool | None = None, **kwargs):
    """`original` (torch.load) forced to weights_only=True with `SAFE_GLOBALS` allowed; mmap only where
    the file is a zip archive (legacy non-zip files load without it)."""
    kwargs.pop("weights_only", None)
    if mmap and isinstance(file, (str, os.PathLike)) and not zipfile.is_zipfile(file):
        mmap = None
    allowed = safe_globals()
    while True:
        try:
            with torch.serialization.safe_globals(allowed):
                return original(file, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)
        except pickle.UnpicklingError as err:
            extra = _optional_global(file, err, allowed)
            if extra is None:
                raise _refusal(file, err) from None
            allowed = [*allowed, extra]
            if hasattr(file, "seek"):
                file.seek(0)


def _optional_global(file, err: Exception, allowed: list):
    """The class of OPTIONAL_SAFE_GLOBALS that `err` says the load needs (imported now), if not yet
    allowed; CheckpointError when its library is not installed."""
    match = _GLOBAL_RE.search(str(err))
    if match is None or match.group(1) not in OPTIONAL_SAFE_GLOBALS:
        return None
    obj = _resolve(match.group(1))
    if obj is None:
        raise CheckpointError(f"{file}: holds {match.group(1)} (8-bit optimizer moments, training.optimizer "
                              "adamw_8bit), whose library is not installed here: pip install 'longvu-train[quant]'")
    return None if obj in allowed else obj


_TORCH_LOAD = torch.load


def safe_torch_load(file, map_location="cpu", mmap: bool | None = None):
    """`torch.load(file, weights_only=True)` with `SAFE_GLOBALS`; UnsafeCheckpointError when it needs more."""
    return _load(_TORCH_LOAD, file, map_location=map_location, mmap=mmap)


@contextlib.contextmanager
def safe_loading():
    """Within: every `torch.load(...)` is `safe_torch_load` (whatever `weights_only` its caller passed)."""
    original = torch.load
    if getattr(original, "_weights_only_guard", False):  # already inside
        yield
        return

    def guarded(file, *args, **kwargs):
        return _load(original, file, *args, **kwargs)

    guarded._weights_only_guard = True
    torch.load = guarded
    try:
        yield
    finally:
        torch.load = original


def pickle_files(folder: str | os.PathLike) -> list[Path]:
    """The pickle files under `folder` (recursively), sorted. `training_args.bin` is the Trainer's record
    of its arguments, which it never loads back (nor does anything here): it is left out."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file()
                  and p.name != "training_args.bin")


def check_pickles(folder: str | os.PathLike, files: list[Path] | None = None) -> None:
    """Load every pickle file of `folder` (or just `files`) weights-only, tensor data memory-mapped
    (zip files) -> UnsafeCheckpointError for the first one that needs more, CheckpointError for one
    that cannot be read at all."""
    for file in pickle_files(folder) if files is None else files:
        try:
            safe_torch_load(file, map_location="cpu", mmap=True)
        except (RuntimeError, OSError, EOFError, ValueError) as err:
            if isinstance(err, CheckpointError):
                raise
            first = (str(err).strip().splitlines() or [repr(err)])[0]
            raise CheckpointError(f"{file}: unreadable ({type(err).__name__}: {first})") from None
