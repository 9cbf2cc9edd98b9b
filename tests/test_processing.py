"""Pixel preprocessing against a PIL reference, and tokenisation with the real Qwen2 tokenizer."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from longvu.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from longvu.processing import (
    ConversationError,
    FrameSize,
    build_prompt_ids,
    preprocess_frames,
    tokenize_conversation,
)

SIGLIP = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
DINO = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def pil_reference(frame: np.ndarray, size: int, mean, std) -> np.ndarray:
    """The reference path: expand2square with int(255*mean), PIL resize (default filter), normalise."""
    img = Image.fromarray(frame)
    w, h = img.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(255 * m) for m in mean))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    arr = np.asarray(canvas.resize((size, size)), dtype=np.float32) / 255.0
    return ((arr - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(2, 0, 1)


def _frames(h: int, w: int, t: int = 2) -> np.ndarray:
    rng = np.random.default_rng(h * 1000 + w)
    noise = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, None, :, None] * np.ones((t, h, 1, 3))
    return np.where(np.arange(t)[:, None, None, None] % 2 == 0, noise, ramp.astype(np.uint8))


@pytest.mark.parametrize("h,w", [(48, 64), (240, 427), (500, 300), (384, 384), (100, 100)])
def test_preprocess_matches_pil(h, w):
    frames = _frames(h, w)
    siglip, dino = preprocess_frames(frames)
    assert siglip.shape == (2, 3, 384, 384) and dino.shape == (2, 3, 378, 378)
    assert siglip.dtype == dino.dtype == torch.float32
    for i in range(2):
        for out, size, (mean, std) in ((siglip, 384, SIGLIP), (dino, 378, DINO)):
            ref = pil_reference(frames[i], size, mean, std)
            # back to 0..1 pixel units before comparing
            err = np.abs(out[i].numpy() - ref) * np.array(std, np.float32)[:, None, None]
            assert err.mean() < 2 / 255, (h, w, i, size, err.mean() * 255)


def test_preprocess_pad_colour_and_small_sizes():
    frames = np.full((3, 10, 40, 3), 200, dtype=np.uint8)  # wide: pad rows at top and bottom
    siglip, dino = preprocess_frames(torch.from_numpy(frames), siglip_size=55, dino_size=54)
    assert siglip.shape == (3, 3, 55, 55) and dino.shape == (3, 3, 54, 54)
    # corner pixels are pure pad colour: SigLIP 127 -> (127/255 - .5)/.5 ; DINO (123,116,103)
    assert torch.allclose(siglip[:, :, 0, 0], torch.full((3, 3), (127 / 255 - 0.5) / 0.5), atol=1e-6)
    want = torch.tensor([(c / 255 - m) / s for c, m, s in zip((123, 116, 103), *DINO)])
    assert torch.allclose(dino[:, :, 0, 0], want.expand(3, 3), atol=1e-6)
    # the centre row is image content: 200 everywhere
    assert torch.allclose(siglip[:, :, 27, 27], torch.full((3, 3), (200 / 255 - 0.5) / 0.5), atol=1e-6)


@pytest.mark.parametrize("bad,msg", [
    (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 3), np.uint8), r"\[T, H, W, 3\]"),
    (np.zeros((0, 8, 8, 3), np.uint8), "non-empty"),
])
def test_preprocess_rejects_bad_input(bad, msg):
    with pytest.raises(ValueError, match=msg):
        preprocess_frames(bad)


def test_frame_size_is_named():
    s = FrameSize(height=720, width=1280)
    assert (s.height, s.width) == (720, 1280) and tuple(s) == (720, 1280)


# --- tokenisation ------------------------------------------------------------------------------


def _expected_ids(tok, text: str) -> list[int]:
    """Tokenise a rendered string, replacing each <image> by IMAGE_TOKEN_INDEX (like tokenizer_image_token)."""
    ids: list[int] = []
    for k, chunk in enumerate(text.split("<image>")):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids += tok(chunk, add_special_tokens=False)["input_ids"]
    return ids


def test_build_prompt_ids(qwen_tokenizer):
    ids = build_prompt_ids(qwen_tokenizer, "What is in the video?")
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
            "What is in the video?<|im_end|>\n<|im_start|>assistant\n")
    assert ids == _expected_ids(qwen_tokenizer, text)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids[:3] == [151644, 8948, 198]
    assert build_prompt_ids(qwen_tokenizer, "Hi", n_media=0).count(IMAGE_TOKEN_INDEX) == 0


def test_tokenize_matches_chat_template_and_masks(qwen_tokenizer):
    tok = qwen_tokenizer
    conv = [{"from": "human", "value": "What happens? <video>"}, {"from": "gpt", "value": "A dog runs."},
            {"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "Brown."}]
    out = tokenize_conversation(tok, conv, n_media=1, model_max_length=512)
    # the chat template renders the same conversation with the placeholder moved to the turn start
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat happens?"}, {"role": "assistant", "content": "A dog runs."},
         {"role": "user", "content": "Which colour?"}, {"role": "assistant", "content": "Brown."}], tokenize=False)
    assert out.input_ids.tolist() == _expected_ids(tok, rendered)
    assert not out.truncated_answer
    ids, labels = out.input_ids.tolist(), out.labels.tolist()
    supervised = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(supervised) == "A dog runs.<|im_end|>Brown.<|im_end|>"
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    # the image token and every user/system newline stay masked
    assert labels[ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX
    assert sum(1 for i, lab in zip(ids, labels) if i == 198 and lab != IGNORE_INDEX) == 0


def test_multi_image_placeholders_each_become_one_token(qwen_tokenizer):
    conv = [{"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "No."}]
    out = tokenize_conversation(qwen_tokenizer, conv, n_media=2, model_max_length=512)
    ids = out.input_ids.tolist()
    k = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[k:k + 4] == [IMAGE_TOKEN_INDEX, 198, IMAGE_TOKEN_INDEX, 198]
    assert ids[k - 3:k] == [151644, 872, 198]  # <|im_start|>user\n
    assert qwen_tokenizer.decode(ids[k + 4:ids.index(151645, k)]) == "and : same?"


def test_text_only_and_system_turn(qwen_tokenizer):
    # user text starting with newlines is tokenised together with its "user\n" header, as in the
    # reference (one "\n\n\n" token, not "\n" + "\n\n")
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "\n\nHi"},
            {"from": "gpt", "value": "Hello"}]
    out = tokenize_conversation(qwen_tokenizer, conv, n_media=0, model_max_length=512)
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n\n\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello<|im_end|>\n")
    assert out.input_ids.tolist() == qwen_tokenizer(text)["input_ids"]
    assert IMAGE_TOKEN_INDEX not in out.input_ids.tolist()


def test_truncation_cuts_answer_and_reports(qwen_tokenizer, caplog):
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "word " * 200}]
    full = tokenize_conversation(qwen_tokenizer, conv, 1, model_max_length=10_000)
    with caplog.at_level(logging.WARNING):
        out = tokenize_conversation(qwen_tokenizer, conv, 1, model_max_length=60, record_id="rec-7")
    assert out.truncated_answer and len(out.input_ids) == 60
    assert out.input_ids.tolist() == full.input_ids[:60].tolist()
    assert "rec-7" in caplog.text and "truncated" in caplog.text
    # cutting only the trailing "\n" of the last turn is not an answer cut
    exact = tokenize_conversation(qwen_tokenizer, conv, 1, model_max_length=len(full.input_ids) - 1)
    assert not exact.truncated_answer


def test_truncation_never_cuts_the_placeholder(qwen_tokenizer):
    # placeholder in a later turn, after 100+ tokens of earlier turns
    conv = [{"from": "human", "value": "long " * 100}, {"from": "gpt", "value": "ok"},
            {"from": "human", "value": "<image> and now?"}, {"from": "gpt", "value": "fine"}]
    with pytest.raises(ConversationError, match="before the media placeholder") as e:
        tokenize_conversation(qwen_tokenizer, conv, 1, model_max_length=20, record_id="r1")
    assert e.value.code == "too_long"
    # the placeholder itself moves to the turn start, so only the system+header must fit
    conv = [{"from": "human", "value": "<image>\n" + "long " * 100}, {"from": "gpt", "value": "ok"}]
    with pytest.raises(ConversationError, match="no answer token left"):
        tokenize_conversation(qwen_tokenizer, conv, 1, model_max_length=40)


@pytest.mark.parametrize("conv,n_media,match", [
    ([{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}], 2, "1 media placeholder"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}], 1, "gpt"),
    ([{"from": "gpt", "value": "x"}, {"from": "human", "value": "hi"}], 0, "alternate"),
    ([{"from": "human", "value": "hi"}], 0, "no gpt turn"),
    ([{"from": "robot", "value": "hi"}], 0, "unknown role"),
    ([{"from": "human"}], 0, "must be"),
    ([], 0, "empty"),
])
def test_bad_conversations(qwen_tokenizer, conv, n_media, match):
    with pytest.raises(ConversationError, match=match):
        tokenize_conversation(qwen_tokenizer, conv, n_media, 512)
