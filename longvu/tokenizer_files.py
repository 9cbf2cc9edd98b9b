"""Tokenizer files for the original LongVU layout: read by transformers 4.42 / tokenizers 0.19 (the
original's pins) as `Qwen2TokenizerFast`, and by transformers 5.x, with the same ids as the source.

Two things differ from what transformers 5.x writes by itself:
- tokenizer_config.json names the class `Qwen2TokenizerFast` (5.x writes `TokenizersBackend`, which
  4.42 does not know) and uses 4.42's field names (`additional_special_tokens`, the chat template
  inline instead of chat_template.jinja);
- tokenizer.json stores the BPE merges as "a b" strings (tokenizers >= 0.20 writes ["a", "b"] pairs,
  which 0.19 cannot parse; both read strings). Byte-level BPE tokens hold no space, so the string
  form is exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ORIGINAL_TOKENIZER_CLASS = "Qwen2TokenizerFast"


def merges_as_strings(tokenizer_json: dict, where: str) -> dict:
    """A tokenizer.json dict with its BPE merges as "a b" strings (pairs holding a space: ValueError)."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: a {model.get('type')} tokenizer; the original LongVU layout needs Qwen2's BPE")
    merges = []
    for merge in model["merges"]:
        if isinstance(merge, str):
            merges.append(merge)
            continue
        if any(" " in part for part in merge):
            raise ValueError(f"{where}: merge {merge} holds a space and cannot be written as 'a b' for tokenizers 0.19")
        merges.append(" ".join(merge))
    return {**tokenizer_json, "model": {**model, "merges": merges}}


def original_tokenizer_config(tokenizer) -> dict:
    """tokenizer_config.json for `tokenizer` with the fields and class name transformers 4.42 reads."""
    extra = getattr(tokenizer, "extra_special_tokens", None) or []
    extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
    added = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(tokenizer.added_tokens_decoder.items())
    }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": [str(t) for t in extra],
        **{name: getattr(tokenizer, name) and str(getattr(tokenizer, name))
           for name in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "clean_up_tokenization_spaces": bool(tokenizer.clean_up_tokenization_spaces),
        "model_max_length": int(tokenizer.model_max_length),
        "padding_side": tokenizer.padding_side,
        "tokenizer_class": ORIGINAL_TOKENIZER_CLASS,
    }
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    return config


def save_original_tokenizer(tokenizer, out_dir: str | os.PathLike) -> None:
    """Write tokenizer.json and tokenizer_config.json of a fast (tokenizers-backed) BPE tokenizer into
    `out_dir` in the form above."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__}: not a tokenizers-backed (fast) tokenizer; "
                         "the original LongVU layout needs a tokenizer.json")
    out = Path(out_dir)
    data = merges_as_strings(json.loads(backend.to_str()), type(tokenizer).__name__)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    config = original_tokenizer_config(tokenizer)
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
