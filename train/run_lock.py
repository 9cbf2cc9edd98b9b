"""One run per output folder: an exclusive `flock` on `RUN/.run.lock`, which names its holder.

The lock belongs to an open file description, so the kernel drops it when every process holding it
has exited, however they exit (kill -9 included). `longvu train` takes it before launching and hands
the descriptor to the launcher process, so it is held for the whole run. The file keeps the last
holder's `pid host time`: finding it filled in but unlocked means that holder died (a stale lock),
which is logged and taken over; a clean release empties it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
HELD_ENV = "LONGVU_RUN_LOCK"  # set for the ranks when `longvu train` already holds the lock


class RunFolderLocked(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """The run folder's lock; `acquire()` raises RunFolderLocked naming the holder's PID and host."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or "an unknown process"
            os.close(fd)
            raise RunFolderLocked(f"{self.path.parent}: another `longvu train` is using this output folder "
                                  f"({_describe(holder)}); wait for it to end or choose another "
                                  "training.output_dir") from None
        stale = _read(fd)
        if stale:
            logger.warning("%s: taking over a stale lock (%s, no longer running)", self.path, _describe(stale))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Empty the file (a clean end leaves no stale record) and unlock."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


def _describe(record: str) -> str:
    parts = record.split()
    if len(parts) >= 2:
        since = f", since {parts[2]}" if len(parts) > 2 else ""
        return f"PID {parts[0]} on host {parts[1]}{since}"
    return record
