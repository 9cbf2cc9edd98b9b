"""Load a LongVU model directory for inference, whatever wrote it.

- ours: a full-model training checkpoint (config.json `longvu` + model.safetensors) or a
  `longvu export --format hf` directory (towers inside or named in config.json);
- an original LongVU directory (`cambrian_qwen`: released checkpoints, `longvu export --format longvu`),
  towers from `siglip_path`/`dino_path` given here or recorded in its config.json (a relative path
  there is relative to the directory);
- either of those plus a LoRA adapter in `DIR/lora_adapter/` (an export without `--merge-lora`).

A LoRA *training* checkpoint (adapter only, no config.json) is refused: export it first.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

ADAPTER_DIR = "lora_adapter"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ModelDirError(ValueError):
    """A directory that cannot be loaded as a LongVU model; the message names it and the reason."""


def load_model_dir(
    path: str | os.PathLike,
    siglip_path: str | os.PathLike | None = None,
    dino_path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    merge_adapter: bool = True,
    **config_overrides,
):
    """`LongVUForCausalLM.from_pretrained` (any layout; `config_overrides` are LongVUConfig fields) in
    eval mode, plus the directory's LoRA adapter when it has one: merged, or with `merge_adapter=False`
    a peft `PeftModel` around the model."""
    from longvu.modeling import LongVUForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise ModelDirError(f"{path}: a LoRA training checkpoint (adapter only); run `longvu export {path} "
                                "--output DIR --merge-lora` and load DIR")
        raise ModelDirError(f"{path}: no config.json: not a model directory")
    model = LongVUForCausalLM.from_pretrained(path, siglip_path=siglip_path, dino_path=dino_path, dtype=dtype,
                                              **config_overrides).eval()
    adapter = path / ADAPTER_DIR
    if not adapter.is_dir():
        return model
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise ModelDirError(f"{adapter}: no adapter_config.json")
    peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    if dtype is not None:
        peft_model.to(dtype)
    peft_model.eval()
    return peft_model.merge_and_unload() if merge_adapter else peft_model


def inference_placement(device: str | None, dtype: str | None) -> tuple[str, torch.dtype]:
    """(device, torch dtype) to answer with: the given ones, else cuda when available (bf16) or the
    CPU (fp32). `dtype` is one of train.model_setup.DTYPES' names."""
    from train.model_setup import DTYPES

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, DTYPES[dtype or ("bf16" if device.startswith("cuda") else "fp32")]


def load_dir_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a model directory, or the offline Qwen2 tokenizer when it holds none
    (original directories may come without one; LongVU uses Qwen2's)."""
    import logging

    from longvu.tokenizer import load_tokenizer

    if any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return load_tokenizer(path)
    logging.getLogger(__name__).warning("%s: no tokenizer files; using the offline Qwen2 tokenizer", path)
    return load_tokenizer(None)
