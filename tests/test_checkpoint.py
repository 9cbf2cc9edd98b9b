"""Checkpoint round trips in our layout (save_pretrained/from_pretrained, Auto classes) and in the
original LongVU layout (config.json `cambrian_qwen` + safetensors, sharded or not, or pytorch_model.bin),
the 144/576 query inference from `pos_embed_0`, and the original config.json mapping."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from longvu.checkpoint import is_original_checkpoint, original_config_dict, save_original_layout
from longvu.config import COMPAT_SWITCHES, LongVUConfig
from longvu.constants import IMAGE_TOKEN_INDEX as IM
from longvu.modeling import LongVUForCausalLM
from longvu.tiny import TINY_DINO_PIXELS, TINY_SIGLIP_PIXELS, tiny_config, tiny_model

SMALL = dict(vocab_size=4096, pad_token_id=0)
ORACLE = Path(__file__).parent / "fixtures" / "oracle.tar.xz"


def _inputs(seed=0, kind="video", n=3, size=(40, 56)):
    g = torch.Generator().manual_seed(seed)
    return dict(
        input_ids=torch.tensor([[1, 5, IM, 6, 7, 8]]),
        pixel_values_siglip=[torch.rand(n, 3, TINY_SIGLIP_PIXELS, TINY_SIGLIP_PIXELS, generator=g)],
        pixel_values_dino=[torch.rand(n, 3, TINY_DINO_PIXELS, TINY_DINO_PIXELS, generator=g)],
        media_sizes=[size], media_kinds=[kind],
    )


@torch.no_grad()
def _logits(model, **kw):
    return model(**(kw or _inputs())).logits


def _state(model, towers=True):
    return {k: v for k, v in model.state_dict().items() if towers or "vision_tower_aux_list" not in k}


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def model():
    # compat switches on, as an original checkpoint loads, so outputs compare across both layouts
    return tiny_model("video", **SMALL, **COMPAT_SWITCHES)


@pytest.fixture(scope="module")
def tower_dirs(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    towers = model.model.vision_tower_aux_list
    towers[0].vision_tower.save_pretrained(root / "siglip")  # a SiglipVisionModel
    towers[1].vision_tower.save_pretrained(root / "dino")  # a Dinov2Model
    return root / "siglip", root / "dino"


# --- our layout -------------------------------------------------------------------------------------


def test_round_trip_with_towers(model, tmp_path):
    model.save_pretrained(tmp_path, include_towers=True)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = LongVUForCausalLM.from_pretrained(tmp_path).eval()
    _assert_same_state(_state(model), _state(loaded))
    assert torch.equal(_logits(model), _logits(loaded))
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(auto, LongVUForCausalLM)
    assert torch.equal(_logits(model), _logits(auto))


def test_round_trip_without_towers(model, tower_dirs, tmp_path):
    from safetensors import safe_open

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys and not any("vision_tower_aux_list" in k for k in keys)
    assert keys == set(_state(model, towers=False))
    siglip, dino = tower_dirs
    loaded = LongVUForCausalLM.from_pretrained(tmp_path, siglip_path=siglip, dino_path=dino).eval()
    _assert_same_state(_state(model), _state(loaded))
    assert torch.equal(_logits(model), _logits(loaded))
    # the tower folders may also come from the config
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["siglip_path"], cfg["dino_path"] = str(siglip), str(dino)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(model), _logits(auto))


def test_missing_towers_without_paths_raise(model, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="siglip_path"):
        LongVUForCausalLM.from_pretrained(tmp_path)


# --- original layout -----------------------------------------------------------------------------------


def _check_original_dir(path: Path, model, tower_dirs, **kw):
    assert is_original_checkpoint(path)
    loaded = LongVUForCausalLM.from_pretrained(path, siglip_path=tower_dirs[0], dino_path=tower_dirs[1],
                                               dtype=torch.float32, **kw).eval()
    for switch in COMPAT_SWITCHES:
        assert getattr(loaded.config, switch) is True
    _assert_same_state(_state(model), _state(loaded))
    for inputs in (_inputs(1), _inputs(2, "image", 1, (56, 40))):
        assert torch.equal(_logits(model, **inputs), _logits(loaded, **inputs))
    return loaded


def test_original_layout_unsharded(model, tower_dirs, tmp_path):
    save_original_layout(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "cambrian_qwen"
    _check_original_dir(tmp_path, model, tower_dirs)
    # from_pretrained detects the original layout too
    loaded = LongVUForCausalLM.from_pretrained(tmp_path, siglip_path=tower_dirs[0], dino_path=tower_dirs[1],
                                               dtype=torch.float32).eval()
    assert torch.equal(_logits(model), _logits(loaded))


def test_original_layout_sharded(model, tower_dirs, tmp_path):
    save_original_layout(model, tmp_path, max_shard_bytes=2**20)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_state(model, towers=False))
    _check_original_dir(tmp_path, model, tower_dirs)


def test_original_layout_pytorch_model_bin(model, tower_dirs, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(original_config_dict(model.config)))
    torch.save(_state(model, towers=False), tmp_path / "pytorch_model.bin")
    _check_original_dir(tmp_path, model, tower_dirs)


def test_576_queries_inferred_from_missing_pos_embed(tower_dirs, tmp_path):
    image_model = tiny_model("image", **SMALL, **COMPAT_SWITCHES)
    assert not any("pos_embed" in k for k in image_model.state_dict())
    save_original_layout(image_model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["image_token_len"], cfg["query_num_list"] = 144, [144]  # the config says 144; the weights say 576
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # the image family's towers have the same shapes; use its own weights
    root = tmp_path / "towers"
    image_model.model.vision_tower_aux_list[0].vision_tower.save_pretrained(root / "siglip")
    image_model.model.vision_tower_aux_list[1].vision_tower.save_pretrained(root / "dino")
    towers = (root / "siglip", root / "dino")
    loaded = LongVUForCausalLM.from_pretrained(tmp_path, siglip_path=towers[0], dino_path=towers[1],
                                               dtype=torch.float32).eval()
    assert loaded.config.image_token_len == 576 and loaded.config.query_num_list == [576]
    assert not any("pos_embed" in k for k in loaded.state_dict())
    inputs = _inputs(3, "image", 1, (48, 48))
    assert torch.equal(_logits(image_model, **inputs), _logits(loaded, **inputs))

    # the video stage starts from the image checkpoint with 144 queries: pos_embed created, rest loaded
    switched = LongVUForCausalLM.from_pretrained(tmp_path, siglip_path=towers[0], dino_path=towers[1],
                                                 dtype=torch.float32, image_token_len=144).eval()
    assert switched.config.image_token_len == 144 and switched.config.query_num_list == [144]
    state = switched.state_dict()
    new = sorted(k for k in state if "pos_embed" in k)
    assert new == sorted(f"model.vision_sampler_0.layers.{l}.pos_embed_{t}" for l in range(3) for t in range(2))
    assert all(state[k].shape == (4, switched.config.vision_hidden_size) for k in new)
    _assert_same_state(_state(image_model), {k: v for k, v in state.items() if "pos_embed" not in k})
    with torch.no_grad():
        out = switched.prepare_multimodal_inputs(torch.tensor([[1, IM, 2]]), None, None,
                                                 **{k: v for k, v in inputs.items() if k != "input_ids"})
    assert out.media[0].tokens.shape[0] == 12 * 13  # a 12 x 12 query grid + newlines (highres off)


# --- original config.json ---------------------------------------------------------------------------


def test_config_from_original_config_json(tmp_path):
    ours = tiny_config("video", vocab_size=152064, drop_threshold=0.7, dino_threshold=0.83)
    original = original_config_dict(ours)
    assert original["model_type"] == "cambrian_qwen"
    assert original["architectures"] == ["CambrianQwenForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(original))
    cfg = LongVUConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, LongVUConfig) and cfg.model_type == "longvu"
    for switch in COMPAT_SWITCHES:
        assert getattr(cfg, switch) is True and getattr(ours, switch) is False
    assert cfg.compat_dino_legacy_pos_interp is True
    # 152064 embedding rows kept; generation limited to the tokenizer's 151646
    assert cfg.vocab_size == 152064 and cfg.generation_vocab_size == 151646
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "image_token_len", "query_num_list", "highres", "lowres_token",
                  "dino_threshold", "drop_threshold", "tokenizer_model_max_length", "tokenizer_padding_side",
                  "mm_vision_tower_aux_list", "mm_vision_tower_aux_token_len_list", "vision_hidden_size",
                  "connector_depth", "num_query_group", "bos_token_id", "eos_token_id", "rms_norm_eps"):
        assert getattr(cfg, field) == getattr(ours, field), field
    assert cfg.rope_parameters["rope_theta"] == 1e6


# The original config.json fields (spec §1.1 table and §1.2).
SPEC_ORIGINAL_KEYS = {
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id",
    "mm_projector_type", "mm_vision_tower_aux_list", "mm_vision_tower_aux_token_len_list", "image_token_len",
    "query_num_list", "num_query_group", "vision_hidden_size", "connector_depth", "connector_only",
    "highres", "lowres_token", "dino_threshold", "drop_threshold", "frame_pos",
    "mm_vision_select_layer", "mm_vision_select_feature", "image_aspect_ratio", "image_position",
    "mm_use_im_start_end", "mm_use_im_patch_token", "mm_projector_lr", "mm_vision_sampler_lr",
    "mm_vision_tower_lr", "connect_layer", "highres_connect", "is_st_sampler", "mm_patch_merge_type",
    "tokenizer_model_max_length", "tokenizer_padding_side", "vocab_size", "rope_theta", "rms_norm_eps",
    "num_of_vision_sampler_layers", "inference_max_length", "unfreeze_mm_vision_tower",
}
# In the released config (spec §1.1, verified) but not in the oracle's config.json.
RELEASED_ONLY_KEYS = {"num_of_vision_sampler_layers"}


def _oracle_config_keys() -> set[str] | None:
    if not ORACLE.is_file():
        return None
    with tarfile.open(ORACLE, "r:xz") as tar:
        for member in tar:
            if member.name.lstrip("./") == "config.json":
                return set(json.load(tar.extractfile(member)))
    return None


def test_original_config_key_set():
    keys = set(original_config_dict(tiny_config("video")))
    assert SPEC_ORIGINAL_KEYS <= keys
    oracle = _oracle_config_keys()
    if oracle is not None:
        assert keys - RELEASED_ONLY_KEYS == oracle


def test_checkpoint_module_imports_no_model_class():
    """checkpoint.py is file I/O only: importing it loads no model module (ours or a tower's)."""
    code = ("import sys, longvu.checkpoint; "
            "print([m for m in sys.modules if m == 'longvu.modeling' or m.startswith('longvu.towers') "
            "or (m.startswith('transformers.models.') and '.modeling_' in m and '.auto.' not in m)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_misspelled_override_names_the_key_and_the_nearest_fields(tmp_path):
    model = tiny_model("video")
    model.save_pretrained(tmp_path, include_towers=True)
    with pytest.raises(ValueError, match=r"'dino_treshold' is not a LongVU model field; did you mean dino_threshold"):
        LongVUForCausalLM.from_pretrained(tmp_path, dino_treshold=0.5)
    loaded = LongVUForCausalLM.from_pretrained(tmp_path, dino_threshold=0.5)
    assert loaded.config.dino_threshold == 0.5
