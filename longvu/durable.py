"""Durable renames: what is renamed into place is on disk first, so a crash or power loss after the
rename finds whole files under the new name, never empty or partial ones (a rename alone is atomic
against a killed process, not against the kernel's unwritten page cache)."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush one file's or directory's data and metadata to the device. A file system that cannot
    flush a directory (EINVAL or ENOTSUP: some network and FUSE mounts) keeps the rename atomic all
    the same; a file that cannot be flushed is an error."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not (Path(path).is_dir() and err.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file under `root`, then each directory, deepest first (their entries name the files)."""
    root = Path(root)
    dirs = [root]
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            dirs.append(path)
        else:
            fsync_path(path)
    for folder in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_path(folder)


def replace_durably(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """`os.replace(src, dst)` of a written file or folder: its contents flushed before, the parent's
    entry after."""
    fsync_tree(src) if Path(src).is_dir() else fsync_path(src)
    os.replace(src, dst)
    fsync_path(Path(dst).parent)


def write_text_durably(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` through a temporary sibling: the old or the new contents, whole."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    replace_durably(tmp, path)
