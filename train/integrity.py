"""File manifests: the size and sha256 of every file of a checkpoint or an export, and their check.

    {"files": {"RELATIVE/PATH": {"size": BYTES, "sha256": HEX}, ...}}

A checkpoint records it as `MANIFEST.json`, an export in `export_info.json` (key "files"). Hashing
streams 8 MiB chunks, several files at a time (hashlib releases the GIL): about disk speed.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from train.safe_load import CheckpointError

MANIFEST = "MANIFEST.json"
CHUNK = 8 * 2**20


class IntegrityError(CheckpointError):
    """A file that differs from its manifest (or is missing from it)."""


def file_digest(path: Path) -> dict:
    """{"size": bytes, "sha256": hex} of one file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def excluded(name: str, exclude: tuple[str, ...]) -> bool:
    """`name` (a relative path) is one of `exclude`, or inside a folder of `exclude`."""
    return any(name == e or name.startswith(e + "/") for e in exclude)


def _files(folder: Path, exclude: tuple[str, ...]) -> list[str]:
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(n for n in names if not excluded(n, exclude))


def digests(folder: str | os.PathLike, names: list[str], workers: int = 4) -> dict[str, dict]:
    """name -> file_digest for `names` (relative to `folder`)."""
    folder = Path(folder)
    with ThreadPoolExecutor(max(1, min(workers, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda n: file_digest(folder / n), names)))


def folder_manifest(folder: str | os.PathLike, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict]:
    """name -> {"size", "sha256"} of every file under `folder` but `exclude` (relative paths)."""
    return digests(folder, _files(Path(folder), exclude))


def write_manifest(folder: str | os.PathLike) -> Path:
    """Record `folder`'s files in `folder/MANIFEST.json` -> its path."""
    out = Path(folder) / MANIFEST
    out.write_text(json.dumps({"files": folder_manifest(folder)}, indent=1) + "\n")
    return out


def read_manifest(folder: str | os.PathLike, name: str = MANIFEST) -> dict[str, dict] | None:
    """The "files" of `folder/name`; None when the folder has no such file."""
    file = Path(folder) / name
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise IntegrityError(f"{file}: unreadable manifest ({err})") from None


def verify_files(folder: str | os.PathLike, recorded: dict[str, dict], exclude: tuple[str, ...] = (MANIFEST,),
                 share: tuple[int, int] = (0, 1)) -> None:
    """Every file of `folder` (but `exclude`: names or folders) is in `recorded` with its size and sha256,
    and every recorded file exists; else IntegrityError naming the first one (in name order) that differs.
    `share=(i, n)`: only every n-th name from the i-th is hashed (one share per rank)."""
    folder = Path(folder)
    present = _files(folder, exclude)
    extra = sorted(set(present) - set(recorded))
    missing = sorted(n for n in set(recorded) - set(present) if not excluded(n, exclude))
    if extra or missing:
        first = min(extra + missing)
        what = "is not in the manifest" if first in extra else "is missing"
        raise IntegrityError(f"{folder / first}: {what} (the folder was changed after it was written)")
    for name in present:
        if folder.joinpath(name).stat().st_size != recorded[name]["size"]:
            raise IntegrityError(f"{folder / name}: size {folder.joinpath(name).stat().st_size} bytes, the "
                                 f"manifest records {recorded[name]['size']} (truncated or changed)")
    mine = present[share[0]::share[1]]
    for name, got in digests(folder, mine).items():
        if got["sha256"] != recorded[name]["sha256"]:
            raise IntegrityError(f"{folder / name}: sha256 differs from the manifest (corrupted or changed)")
