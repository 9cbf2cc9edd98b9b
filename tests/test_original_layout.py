"""Exports the original LongVU code runs unchanged: tower folders and tokenizer files read under
transformers 4.42's rules (tests/original_reader.py, without 4.42 installed), and `--format longvu`
refusing a model whose behaviour the original layout would change."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from longvu.checkpoint import split_tower_file
from longvu.config import COMPAT_SWITCHES
from longvu.tiny import TINY_DINO_PIXELS, TINY_SIGLIP_PIXELS, save_tiny_towers, tiny_model
from longvu.tokenizer import load_tokenizer
from longvu.tokenizer_files import merges_as_strings, save_original_tokenizer
from longvu.towers import load_tower_weights
from original_reader import oracle_keys, read_tokenizer_4_42, read_weights_4_42
from train.export import ExportError, export, probe_inputs, probe_logits
from train.model_dir import load_model_dir

PROMPTS = [
    "Hello, world!",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    "\nWhat happens after 12:30 in the video?<|im_end|>\n<|im_start|>assistant\n",
    "  leading and trailing spaces,\ttabs\n\n\nand 1234567 digits ",
    "naïve café, e\u0301 (NFD), Ünïcödé, 日本語のテキスト, 中文字幕, emoji 🎬🙂",
    "don't I'll we've THEY'RE it's",
    "<|endoftext|>inline specials<|im_end|>",
]


def _tower_weights_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.model.towers.state_dict().values(), b.model.towers.state_dict().values()))


# --- tower folders ----------------------------------------------------------------------------------


def test_tiny_tower_folders_load_under_4_42_rules(tmp_path, oracle_dir):
    expected = oracle_keys(oracle_dir)
    siglip, dino = save_tiny_towers(tmp_path)
    for kind, folder in (("siglip", siglip), ("dino", dino)):
        missing, unexpected, mismatched = read_weights_4_42(folder, kind, expected[kind])
        assert (missing, unexpected, mismatched) == ([], [], []), kind
    assert json.loads((tmp_path / "siglip" / "config.json").read_text())["model_type"] == "siglip_vision_model"
    assert json.loads((tmp_path / "dino" / "config.json").read_text())["model_type"] == "dinov2"
    pre = {k: json.loads((tmp_path / k / "preprocessor_config.json").read_text()) for k in ("siglip", "dino")}
    assert pre["siglip"]["image_processor_type"] == "SiglipImageProcessor"
    assert pre["siglip"]["size"] == {"height": TINY_SIGLIP_PIXELS, "width": TINY_SIGLIP_PIXELS}
    assert pre["siglip"]["image_mean"] == [0.5] * 3 and pre["siglip"]["image_std"] == [0.5] * 3
    assert pre["dino"]["image_processor_type"] == "BitImageProcessor"
    assert pre["dino"]["crop_size"] == {"height": TINY_DINO_PIXELS, "width": TINY_DINO_PIXELS}
    assert pre["dino"]["image_mean"] == [0.485, 0.456, 0.406] and pre["dino"]["image_std"] == [0.229, 0.224, 0.225]


def test_tower_folders_new_and_older_layouts_load_the_same_weights(tmp_path):
    source = tiny_model("video", seed=0)
    siglip, dino = save_tiny_towers(tmp_path / "new")
    # the layout LongVU wrote before: transformers 5.x save_pretrained (SigLIP keys without `vision_model.`)
    for tower, name in zip(source.model.towers, ("siglip", "dino")):
        tower.vision_tower.save_pretrained(tmp_path / "old" / name)
    assert "embeddings.patch_embedding.weight" in load_file(str(tmp_path / "old" / "siglip" / "model.safetensors"))
    for folders in ((siglip, dino), (tmp_path / "old" / "siglip", tmp_path / "old" / "dino")):
        target = tiny_model("video", seed=1)
        assert not _tower_weights_equal(target, source)
        load_tower_weights(target.model.towers, *folders)
        assert _tower_weights_equal(target, source)


def test_tower_folder_of_another_layout_is_named(tmp_path):
    siglip, dino = save_tiny_towers(tmp_path / "t")
    target = tiny_model("video")
    with pytest.raises(ValueError, match=r"t/dino: not a SigLIP tower: no tensor 'vision_model\.embeddings"):
        load_tower_weights(target.model.towers, dino, dino)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_bytes((tmp_path / "t" / "dino" / "config.json").read_bytes())
    state = load_file(str(tmp_path / "t" / "dino" / "model.safetensors"))
    save_file({k.replace("attention.attention.query", "attention.q_proj"): v for k, v in state.items()},
              str(renamed / "model.safetensors"))
    with pytest.raises(ValueError, match="renamed: not a DINOv2 tower: no tensor 'encoder.layer.0.attention.attention.query"):
        load_tower_weights(target.model.towers, siglip, renamed)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: not a SigLIP tower folder"):
        load_tower_weights(target.model.towers, tmp_path / "empty", dino)


def test_split_tower_file_writes_the_hub_layout(tmp_path, oracle_dir):
    configs = json.loads((oracle_dir / "vision_towers_config.json").read_text())
    cfgs = (configs["model.vision_tower_aux_list.0 (SiglipVisionModel)"], configs["model.vision_tower_aux_list.1 (Dinov2Model)"])
    siglip, dino = split_tower_file(oracle_dir / "vision_towers.safetensors", cfgs, tmp_path)
    expected = oracle_keys(oracle_dir)
    assert read_weights_4_42(siglip, "siglip", expected["siglip"]) == ([], [], [])
    assert read_weights_4_42(dino, "dino", expected["dino"]) == ([], [], [])
    assert (siglip / "preprocessor_config.json").is_file() and (dino / "preprocessor_config.json").is_file()


# --- tokenizer files --------------------------------------------------------------------------------


def test_original_tokenizer_reads_under_4_42_rules_with_our_ids(qwen_tokenizer, tmp_path):
    save_original_tokenizer(qwen_tokenizer, tmp_path)
    backend, config = read_tokenizer_4_42(tmp_path)
    assert config["tokenizer_class"] == "Qwen2TokenizerFast"
    assert (config["eos_token"], config["pad_token"]) == ("<|im_end|>", "<|endoftext|>")
    assert config["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert config["chat_template"] == qwen_tokenizer.chat_template
    reread = load_tokenizer(tmp_path)  # transformers 5.x
    assert len(reread) == len(qwen_tokenizer) == backend.get_vocab_size()
    for prompt in PROMPTS:
        ours = qwen_tokenizer(prompt, add_special_tokens=False).input_ids
        assert backend.encode(prompt, add_special_tokens=False).ids == ours, prompt
        assert reread(prompt, add_special_tokens=False).input_ids == ours, prompt
    # 5.x rebuilds Qwen2's BPE from vocab + merges (ignore_merges off, ours on): equal on every input iff
    # every vocabulary entry is what the merges make of it
    model = reread.backend_tokenizer.model
    unreachable = [t for t, i in reread.get_vocab().items() if i < 151643 and [x.id for x in model.tokenize(t)] != [i]]
    assert unreachable == []


def test_default_5x_tokenizer_files_break_the_4_42_rules(qwen_tokenizer, tmp_path):
    qwen_tokenizer.save_pretrained(tmp_path)  # what exports wrote before
    with pytest.raises(AssertionError, match="unknown to transformers 4.42"):
        read_tokenizer_4_42(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2TokenizerFast"}))
    with pytest.raises(AssertionError, match="merges only as 'a b' strings"):
        read_tokenizer_4_42(tmp_path)


def test_merges_as_strings():
    data = {"model": {"type": "BPE", "vocab": {}, "merges": [["a", "b"], "c d", ["Ġ", "ĠĠ"]]}, "other": 1}
    assert merges_as_strings(data, "x") == {"model": {"type": "BPE", "vocab": {}, "merges": ["a b", "c d", "Ġ ĠĠ"]},
                                            "other": 1}
    with pytest.raises(ValueError, match="x: merge \\['a b', 'c'\\] holds a space"):
        merges_as_strings({"model": {"type": "BPE", "merges": [["a b", "c"]]}}, "x")
    with pytest.raises(ValueError, match="x: a WordPiece tokenizer"):
        merges_as_strings({"model": {"type": "WordPiece"}}, "x")


# --- --format longvu exports --------------------------------------------------------------------------


def _source(root, tokenizer, **switches):
    root.mkdir()
    tiny_model("video", tokenizer_model_max_length=1024, **switches).save_pretrained(root, include_towers=True)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def trained_off(tmp_path_factory, qwen_tokenizer):
    """A model trained with our defaults: compat switches off."""
    return _source(tmp_path_factory.mktemp("src") / "off", qwen_tokenizer)


@pytest.fixture(scope="module")
def trained_on(tmp_path_factory, qwen_tokenizer):
    """A model trained with the original's behaviours (all compat switches on)."""
    return _source(tmp_path_factory.mktemp("src") / "on", qwen_tokenizer, **COMPAT_SWITCHES)


def test_longvu_export_refuses_a_behaviour_change(trained_off, tmp_path):
    out = tmp_path / "export"
    with pytest.raises(ExportError) as err:
        export(trained_off, out, fmt="longvu", dtype="fp32", include_towers=True)
    message = str(err.value)
    for switch in COMPAT_SWITCHES:
        assert f"{switch}=True" in message and f"{switch}=False" in message
    assert "--format hf" in message and "--allow-behaviour-change" in message and "model.overrides" in message
    assert not out.exists() and not (tmp_path / "export.incomplete").exists()
    export(trained_off, tmp_path / "hf", fmt="hf", dtype="fp32", include_towers=True)  # our layout keeps them


def test_longvu_export_with_allowed_behaviour_change_records_it(trained_off, tmp_path, qwen_tokenizer):
    out = tmp_path / "export"
    report = export(trained_off, out, fmt="longvu", dtype="fp32", include_towers=True, allow_behaviour_change=True)
    recorded = json.loads((out / "export_info.json").read_text())["behaviour_changes"]
    assert recorded == report["behaviour_changes"]
    assert [(c["switch"], c["trained"], c["original_layout"]) for c in recorded["switches"]] == \
        [(k, False, True) for k in COMPAT_SWITCHES]
    reloaded = load_model_dir(out, dtype=torch.float32)
    assert all(getattr(reloaded.config, k) for k in COMPAT_SWITCHES)  # what the original code will do
    inputs = probe_inputs(reloaded.config, qwen_tokenizer, "cpu")
    assert recorded["switches"] and recorded["probe"]["probe_tokens"]["original_layout"] == probe_logits(reloaded, inputs).shape[1]
    assert recorded["probe"]["probe_tokens"]["source"] != recorded["probe"]["probe_tokens"]["original_layout"]


def test_longvu_export_loads_under_4_42_rules_and_keeps_the_behaviour(trained_on, tmp_path, oracle_dir, qwen_tokenizer):
    out = tmp_path / "export"
    report = export(trained_on, out, fmt="longvu", dtype="fp32", include_towers=True)
    assert "behaviour_changes" not in report
    assert [c["check"] for c in report["verification"]][1] == "logits: reload vs source (fp32)"
    expected = oracle_keys(oracle_dir)
    assert read_weights_4_42(out, "model", expected["model"]) == ([], [], [])
    assert read_weights_4_42(out / "siglip", "siglip", expected["siglip"]) == ([], [], [])
    assert read_weights_4_42(out / "dino", "dino", expected["dino"]) == ([], [], [])
    backend, _ = read_tokenizer_4_42(out)
    assert all(backend.encode(p, add_special_tokens=False).ids == qwen_tokenizer(p, add_special_tokens=False).input_ids
               for p in PROMPTS)
    source = load_model_dir(trained_on, dtype=torch.float32)
    reloaded = load_model_dir(out, dtype=torch.float32)  # no overrides: the switches the layout implies
    inputs = probe_inputs(source.config, qwen_tokenizer, "cpu")
    assert (probe_logits(reloaded, inputs) - probe_logits(source, inputs)).abs().max() <= 1e-5


def test_export_names_a_tower_folder_of_another_layout(tmp_path, qwen_tokenizer):
    source = tmp_path / "src"
    tiny_model("video").save_pretrained(source)  # towers not inside: they come from the folders given
    qwen_tokenizer.save_pretrained(source)
    siglip, dino = save_tiny_towers(tmp_path / "towers")
    with pytest.raises(ExportError, match=r"towers/dino: not a SigLIP tower"):
        export(source, tmp_path / "out", fmt="hf", dtype="fp32", siglip_path=dino, dino_path=dino)
    assert not (tmp_path / "out").exists()
