"""scripts/parity.py against the oracle made by running the original LongVU code."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "parity.py"


def _parity_module():
    spec = importlib.util.spec_from_file_location("parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_oracle_case_matches(oracle_dir, capsys):
    assert _parity_module().main([str(oracle_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    cases = sorted(p.parent.name for p in oracle_dir.glob("*/outputs.safetensors"))
    assert len(cases) == 8
    for case in cases:
        line = next(line for line in lines if line.startswith(case + " "))
        assert "DIFFER" not in line and "FAIL" not in line, line
    assert lines[-1] == "8/8 cases match"


def _one_case_oracle(oracle_dir: Path, tmp_path: Path, case: str) -> Path:
    """A copy of the oracle holding only `case` (model files linked, case files copied)."""
    root = tmp_path / "oracle"
    root.mkdir()
    for entry in oracle_dir.iterdir():
        if entry.is_file():
            os.symlink(entry, root / entry.name)
    (root / case).mkdir()
    for f in (oracle_dir / case).iterdir():
        (root / case / f.name).write_bytes(f.read_bytes())
    return root


def test_a_wrong_reference_value_fails(oracle_dir, tmp_path, capsys):
    root = _one_case_oracle(oracle_dir, tmp_path, "image")
    outputs = load_file(str(root / "image" / "outputs.safetensors"))
    outputs["loss"] = outputs["loss"] + 0.01  # beyond 1e-4 * max(1, |loss|)
    outputs["generated_ids"] = outputs["generated_ids"].clone()
    outputs["generated_ids"][-1] += 1
    save_file(outputs, str(root / "image" / "outputs.safetensors"))
    assert _parity_module().main([str(root)]) == 1
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("image "))
    assert "loss" in line.split("FAIL:")[1] and "greedy-5 DIFFER" in line
