"""A malicious pickle for the safe-loading tests: unpickling it runs `touch MARKER`."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious(file: Path, marker: Path, legacy: bool = False) -> Path:
    """A torch.save file holding a tensor and the payload (zip format, or the legacy one)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.ones(2), "x": Payload(marker)}, file, _use_new_zipfile_serialization=not legacy)
    return file
