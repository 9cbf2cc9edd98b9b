"""`longvu export` from real tiny DeepSpeed runs (ZeRO-2, ZeRO-3, LoRA on ZeRO-3), in both layouts.

The runs (`longvu train`, 2 CPU processes, 2 steps each) are shared by the whole module. "Training
model" = the fp32 masters consolidated from the DeepSpeed shards (plus, for LoRA, the rebuilt base);
every export is reloaded here, independently of export's own check, and compared with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longvu.checkpoint import TOWER_PREFIX, checkpoint_tensor_shapes, is_original_checkpoint
from longvu.config import COMPAT_SWITCHES
from longvu.modeling import LongVUForCausalLM
from train.export import ExportError, export, load_source, probe_inputs, probe_logits, resolve_checkpoint
from train.model_dir import ADAPTER_DIR, load_dir_tokenizer, load_model_dir

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _train(root: Path, name: str, zero: int, lora: bool, manifest: Path, towers: tuple[str, str]) -> Path:
    out = root / name
    cfg = {
        "stage": "custom",
        "model": {"init": "tiny:video", "dtype": "fp32", "siglip_path": towers[0], "dino_path": towers[1],
                  # trained with the original's behaviours, so --format longvu keeps them (else it refuses)
                  "overrides": {"tokenizer_model_max_length": 1024, **COMPAT_SWITCHES}},
        "data": {"train_manifest": str(manifest), "per_device_batch_size": 2, "max_tokens_per_batch": 4096,
                 "num_workers": 0},
        "training": {"output_dir": str(out), "max_steps": 2, "save_steps": 2, "report_to": [],
                     "learning_rate": 1e-3},
        "deepspeed": str(REPO / f"configs/deepspeed/zero{zero}.json"),
    }
    if lora:
        cfg["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    (root / f"{name}.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    proc = subprocess.run([sys.executable, "-m", "train", "train", str(root / f"{name}.yaml")], cwd=REPO,
                          capture_output=True, text=True, timeout=900)  # 2 steps; slow on a loaded machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"zero2": RUN_DIR, "zero3": RUN_DIR, "lora": RUN_DIR} + tower folders, trained once per module."""
    from data.synthetic import write_synthetic_dataset
    from longvu.tiny import save_tiny_towers

    root = tmp_path_factory.mktemp("runs")
    manifest = write_synthetic_dataset(root / "data", 4, 4)
    towers = save_tiny_towers(root / "towers")
    return {
        "zero2": _train(root, "zero2", 2, False, manifest, towers),
        "zero3": _train(root, "zero3", 3, False, manifest, towers),
        "lora": _train(root, "lora", 3, True, manifest, towers),
        "towers": towers,
    }


@pytest.fixture(scope="module")
def sources(runs):
    """Reference logits of each run's training model (fp32 masters) on the probe, and its tokenizer."""
    out = {}
    for name in ("zero2", "zero3", "lora"):
        ckpt = resolve_checkpoint(runs[name])
        src = load_source(ckpt)
        tok = load_dir_tokenizer(ckpt)
        inputs = probe_inputs(src.longvu.config, tok, "cpu")
        out[name] = dict(inputs=inputs, logits=probe_logits(src.model, inputs), config=src.longvu.config,
                         weights=src.weights, connector=src.longvu.state_dict()["model.mm_projector.0.weight"].clone())
    return out


def _masters(run: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(resolve_checkpoint(run)))


def _reload_logits(out: Path, source: dict, **towers):
    model = load_model_dir(out, dtype=torch.float32, merge_adapter=False, **towers)
    return model, probe_logits(model, source["inputs"])


def _oracle_model_keys(oracle_dir: Path) -> set[str]:
    keys, section = set(), None
    for line in (oracle_dir / "keys.txt").read_text().splitlines():
        if line.startswith("#"):
            section = line.split()[1]
        elif line.strip() and section == "model.safetensors":
            keys.add(line.split("\t")[0])
    return keys


# --- full fine-tunes (ZeRO-2, ZeRO-3) ----------------------------------------------------------------


@pytest.mark.parametrize("run_name", ["zero2", "zero3"])
def test_source_is_the_fp32_masters(runs, run_name):
    src = load_source(resolve_checkpoint(runs[run_name]))
    state = src.longvu.state_dict()
    masters = _masters(runs[run_name])
    assert any("DeepSpeed fp32 masters" in w for w in src.weights)
    assert masters and all(torch.equal(state[k], v) for k, v in masters.items())


@pytest.mark.parametrize("run_name,fmt", [("zero2", "hf"), ("zero2", "longvu"), ("zero3", "hf"), ("zero3", "longvu")])
def test_full_export_reloads_with_training_logits(runs, sources, tmp_path, run_name, fmt, oracle_dir):
    out = tmp_path / "export"
    report = export(runs[run_name], out, fmt=fmt, dtype="fp32", max_shard_size="30MB")  # run dir: newest ckpt
    assert report["source"].endswith("checkpoint-2")
    assert (out / "model.safetensors.index.json").is_file()  # sharded, with an index
    for name in ("generation_config.json", "tokenizer.json", "config.json", "export_info.json"):
        assert (out / name).is_file(), name
    towers = dict(siglip_path=runs["towers"][0], dino_path=runs["towers"][1]) if fmt == "longvu" else {}
    _, logits = _reload_logits(out, sources[run_name], **towers)  # hf: config.json names the towers
    assert (logits - sources[run_name]["logits"]).abs().max() <= 1e-5
    config = json.loads((out / "config.json").read_text())
    keys = set(checkpoint_tensor_shapes(out))
    if fmt == "longvu":
        oracle_config = set(json.loads((oracle_dir / "config.json").read_text()))
        released_only = {"num_of_vision_sampler_layers"}  # spec §1.1: in the released config, not the oracle's
        assert set(config) - released_only == oracle_config
        assert keys == _oracle_model_keys(oracle_dir)  # tiny shapes: same architecture as the oracle's
        assert config["model_type"] == "cambrian_qwen"
        assert is_original_checkpoint(out)
        LongVUForCausalLM.from_pretrained(out, siglip_path=runs["towers"][0], dino_path=runs["towers"][1])
    else:
        assert config["model_type"] == "longvu" and not any(k.startswith(TOWER_PREFIX) for k in keys)
        assert config["siglip_path"] == str(Path(runs["towers"][0]).resolve())


@pytest.mark.parametrize("fmt", ["hf", "longvu"])
def test_export_with_towers_needs_no_paths(runs, sources, tmp_path, fmt, oracle_dir):
    out = tmp_path / "export"
    export(runs["zero3"], out, fmt=fmt, dtype="bf16", include_towers=True)
    model = load_model_dir(out)  # nothing else given
    logits = probe_logits(model.float(), sources["zero3"]["inputs"]) if fmt == "hf" else None
    if fmt == "hf":
        assert any(k.startswith(TOWER_PREFIX) for k in checkpoint_tensor_shapes(out))
        scale = sources["zero3"]["logits"].abs().max().clamp(min=1)
        assert (logits - sources["zero3"]["logits"]).abs().max() <= 5e-2 * scale
        assert next(model.parameters()).dtype == torch.float32  # cast above; stored as bf16:
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    else:
        assert (out / "siglip" / "config.json").is_file() and (out / "dino" / "model.safetensors").is_file()
        assert (out / "siglip" / "preprocessor_config.json").is_file()
        config = json.loads((out / "config.json").read_text())
        oracle_config = set(json.loads((oracle_dir / "config.json").read_text()))
        assert set(config) - {"num_of_vision_sampler_layers"} == oracle_config | {"siglip_path", "dino_path"}
        assert (config["siglip_path"], config["dino_path"]) == ("siglip", "dino")


# --- LoRA ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["hf", "longvu"])
def test_lora_merged(runs, sources, tmp_path, fmt):
    out = tmp_path / "merged"
    report = export(runs["lora"], out, fmt=fmt, dtype="fp32", merge_lora=True)
    assert report["lora"] == "merged" and not (out / ADAPTER_DIR).exists()
    model, logits = _reload_logits(out, sources["lora"], siglip_path=runs["towers"][0],
                                   dino_path=runs["towers"][1])
    assert (logits - sources["lora"]["logits"]).abs().max() <= 1e-5
    assert not any("lora_" in k for k in model.state_dict())
    # the fully trained connector/projector survived the merge: equal to the trained values ...
    trained = load_file(str(resolve_checkpoint(runs["lora"]) / "non_lora_trainables.safetensors"))
    masters = _masters(runs["lora"])
    written = model.state_dict()
    for key in ("model.mm_projector.0.weight", "model.vision_query", "model.image_newline",
                "model.vision_sampler_0.layers.0.proj_in.weight"):
        assert torch.equal(written[key], masters[f"base_model.model.{key}"]), key
        assert torch.allclose(written[key], trained[key]), key
    # ... which differ from the base's initial values (training moved them)
    from longvu.tiny import tiny_model

    base = tiny_model("video", tokenizer_model_max_length=1024).state_dict()
    assert not torch.allclose(written["model.mm_projector.0.weight"], base["model.mm_projector.0.weight"])


@pytest.mark.parametrize("fmt", ["hf", "longvu"])
def test_lora_unmerged_base_plus_adapter(runs, sources, tmp_path, fmt):
    out = tmp_path / "unmerged"
    report = export(runs["lora"], out, fmt=fmt, dtype="fp32")
    assert report["lora"] == f"adapter in {ADAPTER_DIR}/"
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    keys = set(checkpoint_tensor_shapes(out))
    assert not any("lora_" in k for k in keys) and "model.mm_projector.0.weight" in keys
    model, logits = _reload_logits(out, sources["lora"], siglip_path=runs["towers"][0],
                                   dino_path=runs["towers"][1])
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert (logits - sources["lora"]["logits"]).abs().max() <= 1e-5
    merged = load_model_dir(out, *runs["towers"], dtype=torch.float32, merge_adapter=True)
    assert (probe_logits(merged, sources["lora"]["inputs"]) - sources["lora"]["logits"]).abs().max() <= 1e-5


# --- refusals and errors -----------------------------------------------------------------------------


def test_refuses_non_empty_output_without_force(runs, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "train", "export", str(runs["zero2"]), "--output", str(out),
                           "--dtype", "fp32"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not empty" in proc.stderr and "--force" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    export(runs["zero2"], out, dtype="fp32", force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_missing_towers_name_the_paths(runs, tmp_path):
    ckpt = resolve_checkpoint(runs["zero2"])
    copy = tmp_path / "run"
    (copy / ckpt.name).mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (copy / ckpt.name / f).write_bytes((ckpt / f).read_bytes())
    cfg = json.loads((copy / ckpt.name / "config.json").read_text())
    cfg["siglip_path"], cfg["dino_path"] = "/nowhere/siglip", "/nowhere/dino"
    (copy / ckpt.name / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="/nowhere/siglip.*missing.*--siglip-path"):
        export(copy, tmp_path / "out", dtype="fp32")
    export(copy, tmp_path / "out", dtype="fp32", siglip_path=runs["towers"][0], dino_path=runs["towers"][1])
