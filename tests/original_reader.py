"""A reader that follows transformers 4.42's loading rules (the original LongVU's pin), without 4.42.

- Weights: 4.42 loads a tensor only under the exact name the model has; its one leniency is the base
  model prefix (a checkpoint with it into a model without, or the other way round), and it renames
  `gamma`/`beta` to `weight`/`bias`. Anything else is a missing key, initialised at random with
  only a warning. The names 4.42's classes have come from the oracle's keys.txt, written by the
  original code under 4.42.
- Tokenizer: AutoTokenizer takes `tokenizer_class` from tokenizer_config.json and must know it (for
  Qwen2: Qwen2Tokenizer, Qwen2TokenizerFast); the fast class loads tokenizer.json as it is, and
  tokenizers 0.19 parses BPE merges only as "a b" strings.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

TOKENIZER_CLASSES_4_42 = ("Qwen2Tokenizer", "Qwen2TokenizerFast")  # 4.42's TOKENIZER_MAPPING for qwen2
BASE_MODEL_PREFIX_4_42 = {"model": "model", "siglip": "siglip", "dino": "dinov2"}
_ORACLE_SECTIONS = {"model.safetensors": "model", "vision_towers.safetensors": "towers"}
_ORACLE_TOWER_PREFIX = "model.vision_tower_aux_list.{}.vision_tower."


def oracle_keys(oracle_dir: Path) -> dict[str, dict[str, list[int]]]:
    """{"model": ..., "siglip": ..., "dino": ...}: the tensor names and shapes of CambrianQwenForCausalLM
    and of 4.42's SiglipVisionModel / Dinov2Model, as the oracle's keys.txt lists them."""
    out = {"model": {}, "siglip": {}, "dino": {}}
    section = None
    for line in (Path(oracle_dir) / "keys.txt").read_text().splitlines():
        if line.startswith("#"):
            section = _ORACLE_SECTIONS.get(line.split()[1])
            continue
        if not line.strip() or section is None:
            continue
        name, shape = line.split("\t")[:2]
        shape = json.loads(shape)
        if section == "model":
            out["model"][name] = shape
            continue
        for i, kind in enumerate(("siglip", "dino")):
            prefix = _ORACLE_TOWER_PREFIX.format(i)
            if name.startswith(prefix):
                out[kind][name[len(prefix):]] = shape
    return out


def _fix_key(key: str) -> str:
    if "beta" in key:
        return key.replace("beta", "bias")
    if "gamma" in key:
        return key.replace("gamma", "weight")
    return key


def load_by_name_4_42(file_shapes: dict[str, list[int]], model_shapes: dict[str, list[int]], prefix: str):
    """(missing, unexpected, mismatched) when 4.42 loads tensors `file_shapes` into a model whose
    state dict is `model_shapes` and whose base_model_prefix is `prefix`."""
    loaded = {_fix_key(k): v for k, v in file_shapes.items()}
    has_prefix = any(k.startswith(prefix) for k in loaded)
    expects_prefix = any(k.startswith(prefix) for k in model_shapes)
    expected = dict(model_shapes)
    if expects_prefix and not has_prefix:
        expected = {k.removeprefix(prefix + "."): v for k, v in expected.items()}
    elif has_prefix and not expects_prefix:
        expected = {f"{prefix}.{k}": v for k, v in expected.items()}
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(loaded) if list(expected[k]) != list(loaded[k]))
    return missing, unexpected, mismatched


def file_shapes(folder: Path) -> dict[str, list[int]]:
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def read_weights_4_42(folder: Path, kind: str, model_shapes: dict[str, list[int]]):
    """(missing, unexpected, mismatched) of `folder/model.safetensors` for the 4.42 class of `kind`."""
    return load_by_name_4_42(file_shapes(folder), model_shapes, BASE_MODEL_PREFIX_4_42[kind])


def read_tokenizer_4_42(folder: Path):
    """The `tokenizers.Tokenizer` 4.42's Qwen2TokenizerFast would run, after its rules are checked
    (AssertionError naming the broken rule), and the tokenizer_config.json dict."""
    from tokenizers import Tokenizer

    config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    assert config.get("tokenizer_class") in TOKENIZER_CLASSES_4_42, \
        f"tokenizer_class {config.get('tokenizer_class')!r} is unknown to transformers 4.42"
    text = (Path(folder) / "tokenizer.json").read_text(encoding="utf-8")
    merges = json.loads(text)["model"]["merges"]
    bad = [m for m in merges if not isinstance(m, str) or len(m.split(" ")) != 2]
    assert not bad, f"tokenizers 0.19 parses merges only as 'a b' strings; got e.g. {bad[:2]}"
    return Tokenizer.from_str(text), config
