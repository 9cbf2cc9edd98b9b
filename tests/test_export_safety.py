"""`longvu export` on bad sources and destinations, from a tiny model directory (towers inside, no
training): tampered files refused before anything runs, manifests recorded and checked, DeepSpeed
state that is missing or unreadable never silently replaced by the model weights, the tokenizer
required, `--force` onto a file refused, and replacement atomic under an injected crash."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longvu.tiny import tiny_model
from pickle_helpers import Payload
from train import export as export_module
from train.export import ExportError, export
from train.integrity import IntegrityError
from train.safe_load import CheckpointError, UnsafeCheckpointError

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen_tokenizer) -> Path:
    """A tiny LongVU (towers inside) with its tokenizer, in our layout."""
    root = tmp_path_factory.mktemp("source") / "model"
    tiny_model("video").save_pretrained(root, include_towers=True)
    qwen_tokenizer.save_pretrained(root)
    return root


def _copy(src: Path, dst: Path, without: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*without))
    return dst


def _bin_source(model_dir: Path, dst: Path, extra: dict | None = None, legacy: bool = False) -> Path:
    """`model_dir` with pytorch_model.bin (its tensors + `extra`) instead of model.safetensors."""
    from safetensors.torch import load_file

    out = _copy(model_dir, dst, without=("model.safetensors",))
    state = load_file(str(model_dir / "model.safetensors")) | (extra or {})
    torch.save(state, out / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return out


def _export(src: Path, out: Path, **kw) -> dict:
    return export(src, out, dtype="fp32", include_towers=True, device="cpu", **kw)


# --- tampered files ---------------------------------------------------------------------------------------


def test_malicious_pytorch_model_bin_never_runs(model_dir, tmp_path):
    marker = tmp_path / "CODE_RAN"
    src = _bin_source(model_dir, tmp_path / "src", extra={"x": Payload(marker)})
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model.bin: refused: .*posix\.system"):
        _export(src, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_malicious_source_refused_by_the_cli_in_one_line(model_dir, tmp_path):
    marker = tmp_path / "CODE_RAN"
    src = _bin_source(model_dir, tmp_path / "src", extra={"x": Payload(marker)})
    proc = subprocess.run([sys.executable, "-m", "train", "export", str(src), "-o", str(tmp_path / "out"),
                           "--include-towers"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = f"longvu export: {src / 'pytorch_model.bin'}: refused"
    assert line in proc.stderr and "posix.system" in proc.stderr
    assert "Traceback" not in proc.stderr and "UnpicklingError" not in proc.stderr
    assert not marker.exists()


def test_legacy_pytorch_model_bin_exports(model_dir, tmp_path):
    """A legacy (non-zip) torch.save file of plain tensors loads weights-only, without mmap."""
    src = _bin_source(model_dir, tmp_path / "src", legacy=True)
    report = _export(src, tmp_path / "out")
    assert report["verification"][-1]["max_abs_diff"] <= 1e-5


def test_export_records_and_checks_file_hashes(model_dir, tmp_path):
    first = tmp_path / "first"
    report = _export(model_dir, first)
    files = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert sorted(report["files"]) == [f for f in files if f != "export_info.json"]
    for name, entry in report["files"].items():
        data = (first / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((first / "export_info.json").read_text())["files"] == report["files"]
    _export(first, tmp_path / "second")  # an intact export is a valid source
    weights = first / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"{weights}: sha256 differs"):
        _export(first, tmp_path / "third")
    assert not (tmp_path / "third").exists()


# --- DeepSpeed state: never a silent fallback to the model weights ---------------------------------------


def test_missing_latest_is_an_error_unless_weights_model(model_dir, tmp_path):
    src = _copy(model_dir, tmp_path / "src")
    (src / "global_step2").mkdir()
    with pytest.raises(ExportError, match=r"latest: missing.*--weights model"):
        _export(src, tmp_path / "out")
    report = _export(src, tmp_path / "out", weights="model")
    assert report["weights"] == ["src model weights"]


def test_unreadable_masters_are_an_error_unless_weights_model(model_dir, tmp_path):
    src = _copy(model_dir, tmp_path / "src")
    (src / "latest").write_text("global_step2")
    (src / "global_step2").mkdir()
    (src / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ExportError, match=r"global_step2: the DeepSpeed fp32 master weights cannot be read.*"
                                          r"--weights model"):
        export_module.zero_fp32_masters(src)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: unreadable"):
        _export(src, tmp_path / "out")  # the source check sees it first
    _export(src, tmp_path / "out", weights="model")  # shards not read: not checked either


# --- tokenizer and destination -----------------------------------------------------------------------------


def test_a_source_without_tokenizer_needs_one_named(model_dir, tmp_path, qwen_tokenizer):
    src = _copy(model_dir, tmp_path / "src", without=TOKENIZER_FILES)
    with pytest.raises(ExportError, match=r"no tokenizer files.*--tokenizer"):
        _export(src, tmp_path / "out")
    _export(src, tmp_path / "out", tokenizer="qwen2")
    from longvu.tokenizer import load_tokenizer

    assert load_tokenizer(tmp_path / "out")("Hello, world!").input_ids == [9707, 11, 1879, 0]


def test_force_onto_a_regular_file_is_refused_before_any_work(model_dir, tmp_path, monkeypatch):
    target = tmp_path / "model.txt"
    target.write_text("mine")
    monkeypatch.setattr(export_module, "load_source", lambda *a, **k: pytest.fail("the source was loaded"))
    with pytest.raises(ExportError, match="is not a directory"):
        _export(model_dir, target, force=True)
    assert target.read_text() == "mine"


def test_force_replacement_survives_a_crash_at_each_step(model_dir, tmp_path, monkeypatch):
    """A kill during `--force`'s replacement (while deleting the old DIR, or between the renames) leaves
    DIR complete, old or new, or absent; never part of one; the next export cleans up."""
    out = tmp_path / "out"
    _export(model_dir, out)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rmtree, real_replace = shutil.rmtree, os.replace

    def crash_in_delete(path, *a, **k):
        if Path(path).name in ("out", "out.replaced") and Path(path).exists():
            victim = next(Path(path).glob("*.safetensors"))
            victim.unlink()  # part of the old export is gone, then the process dies
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **k)

    def crash_between_renames(src, dst):  # the old DIR is aside, the new one not yet moved in
        if Path(src).name == "out.incomplete":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    for patch in (("shutil.rmtree", crash_in_delete), ("os.replace", crash_between_renames)):
        monkeypatch.setattr(*patch)
        with pytest.raises(KeyboardInterrupt):
            _export(model_dir, out, force=True)
        monkeypatch.undo()
        if out.exists():
            assert {p.name for p in out.iterdir()} == set(old)  # the same source: the same files
            export_module.verify_source(out)
        else:
            assert {p.name: p.read_bytes() for p in (tmp_path / "out.replaced").iterdir()} == old
        _export(model_dir, out, force=True)  # recovers
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        export_module.verify_source(out)
