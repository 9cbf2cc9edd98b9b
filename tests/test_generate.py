"""`longvu generate` on a tiny exported model and a written clip, and the media cache behind
`--interactive` (towers once for several questions; recomputed when the prompt length changes
whether temporal reduction applies; always equal to the uncached pipeline)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longvu.media_cache import MediaCache
from longvu.processing import FrameSize, build_prompt_ids, preprocess_frames
from longvu.tiny import TINY_DINO, tiny_model

REPO = Path(__file__).resolve().parents[1]


def _tower_calls(model) -> dict:
    calls = {"siglip": 0, "dino": 0}
    for tower, name in zip(model.model.towers, calls):
        tower.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def _video(n: int, seed: int = 0):
    from data.synthetic import scene_frames

    siglip, dino = preprocess_frames(scene_frames(n, 48, 64, n_scenes=3, seed=seed), 55, 54)
    return dict(pixel_values_siglip=[siglip], pixel_values_dino=[dino], media_sizes=[FrameSize(48, 64)],
                media_kinds=["video"])


def _embeds(model, ids, media, encoder=None):
    with torch.no_grad():
        return model.prepare_multimodal_inputs(torch.tensor([ids]), None, None, **media,
                                               media_encoder=encoder).inputs_embeds


def test_cache_runs_towers_once_for_three_questions(qwen_tokenizer):
    model = tiny_model("video")
    media = _video(12)
    questions = ["How many scenes?", "What colour is the sky in the second scene of this clip?", "Why?"]
    cache = MediaCache()
    calls = _tower_calls(model)
    cached = [_embeds(model, build_prompt_ids(qwen_tokenizer, q), media, cache) for q in questions]
    assert calls == {"siglip": 1, "dino": 1} and cache.encodes == 1 and len(cache) == 1
    for q, got in zip(questions, cached):
        assert torch.equal(got, _embeds(model, build_prompt_ids(qwen_tokenizer, q), media))
    assert calls == {"siglip": 4, "dino": 4}  # the uncached references ran them each time


def test_cache_recomputes_when_question_length_flips_frame_selection(qwen_tokenizer):
    """30 frames; the short prompt's budget allows 31 frames (no temporal reduction), the long one's 30
    (reduction runs): two entries, each equal to the uncached result, and each reused afterwards."""
    short = build_prompt_ids(qwen_tokenizer, "Why?")
    long = build_prompt_ids(qwen_tokenizer, "Why? " * 20)
    max_len = 16 + 31 * 64 + len(short)  # regime budget of the short prompt = 31 frames * 64 tokens
    model = tiny_model("video", tokenizer_model_max_length=max_len)
    media = _video(30, seed=1)
    cache = MediaCache()
    first = _embeds(model, short, media, cache)
    second = _embeds(model, long, media, cache)
    assert cache.encodes == 2
    assert _embeds(model, short, media, cache).shape == first.shape and cache.encodes == 2
    assert torch.equal(first, _embeds(model, short, media))
    assert torch.equal(second, _embeds(model, long, media))
    with torch.no_grad():
        stats = model.prepare_multimodal_inputs(torch.tensor([long]), None, None, **media).stats
    assert stats.frames_kept[0] < 30  # the long prompt's path selected frames


def test_generate_with_cache_matches_uncached(qwen_tokenizer):
    model = tiny_model("video")
    media = _video(6)
    ids = torch.tensor([build_prompt_ids(qwen_tokenizer, "What happens?")])
    cache = MediaCache()
    a = model.generate(ids, **media, media_encoder=cache, max_new_tokens=4, do_sample=False)
    b = model.generate(ids, **media, media_encoder=cache, max_new_tokens=4, do_sample=False)
    c = model.generate(ids, **media, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b) and torch.equal(a, c) and cache.encodes == 1


# --- the CLI on an exported model ---------------------------------------------------------------------


FP8_ALIGNED_DINO = dict(TINY_DINO, hidden_size=48)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, qwen_tokenizer):
    """A tiny model directory (towers inside; DINO 48 wide, so --fp8-towers applies) -> `longvu export`
    (hf, fp32) -> DIR; plus a clip."""
    from data.synthetic import write_scene_video
    from train.export import export

    root = tmp_path_factory.mktemp("generate")
    src = root / "model"
    tiny_model("video", dino_config=FP8_ALIGNED_DINO).save_pretrained(src, include_towers=True)
    qwen_tokenizer.save_pretrained(src)
    export(src, root / "export", dtype="fp32", include_towers=True)
    clip = write_scene_video(root / "clip.mp4", seconds=6, fps=10, height=48, width=64, n_scenes=2, seed=5)
    return root / "export", clip


def _longvu(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, input=stdin, capture_output=True,
                          text=True, timeout=300)


def _generate_json(model_dir, clip, *flags, new_tokens: int = 3):
    """`longvu generate --json` on the clip, asserted to exit 0 -> (its last JSON result, the process)."""
    proc = _longvu("generate", "--model", str(model_dir), "--video", clip, "--question", "How many scenes?",
                   "--max-new-tokens", str(new_tokens), "--json", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def test_cli_generate_json_and_streaming(exported):
    model_dir, clip = exported
    result, proc = _generate_json(model_dir, clip, new_tokens=6)
    assert result["frames_decoded"] == 6 and 1 <= result["frames_kept"] <= 6
    assert result["visual_tokens"] > 0 and result["new_tokens"] >= 1 and isinstance(result["answer"], str)
    t = result["timings"]  # decode, vision, prefill and first token, each measured; prefill = first - vision
    assert t["decode_s"] > 0 and 0 < t["vision_s"] < t["first_token_s"] <= t["generate_s"]
    assert abs(t["prefill_s"] - (t["first_token_s"] - t["vision_s"])) < 1e-6
    assert "decode: 6 frames" in proc.stderr and f"{result['frames_kept']}/6 frames kept" in proc.stderr
    assert "prefill: " in proc.stderr
    streamed = _longvu("generate", "--model", str(model_dir), "--video", clip, "--question", "How many scenes?",
                       "--max-new-tokens", "6")
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    assert streamed.stdout.strip() == result["answer"].strip()  # greedy: the same words, streamed
    assert f"{result['visual_tokens']} visual tokens" in streamed.stderr


def test_cli_interactive_reads_questions_from_stdin(exported):
    model_dir, clip = exported
    proc = _longvu("generate", "--model", str(model_dir), "--video", clip, "--interactive", "--json",
                   "--max-new-tokens", "3", stdin="What colour?\n\nHow many scenes are there?\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["question"] for r in rows] == ["What colour?", "How many scenes are there?"]


def test_cli_generate_image_and_errors(exported, tmp_path):
    from PIL import Image

    model_dir, _ = exported
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    proc = _longvu("generate", "--model", str(model_dir), "--image", str(tmp_path / "red.png"), "--question",
                   "What colour?", "--max-new-tokens", "2", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["media_kind"] == "image"
    missing = _longvu("generate", "--model", str(model_dir), "--video", str(tmp_path / "none.mp4"), "--question", "?")
    assert missing.returncode == 2 and "none.mp4" in missing.stderr
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    lora = _longvu("generate", "--model", str(tmp_path / "adapter"), "--image", str(tmp_path / "red.png"),
                   "--question", "?")
    assert lora.returncode == 2 and "--merge-lora" in lora.stderr


def test_cli_generate_with_4bit_llm(exported):
    pytest.importorskip("torchao")
    model_dir, clip = exported
    result, _ = _generate_json(model_dir, clip, "--llm-4bit", "--decode-workers", "1")
    assert result["frames_decoded"] == 6 and result["new_tokens"] >= 1


def test_cli_generate_with_fp8_towers(exported, tmp_path):
    model_dir, clip = exported
    result, _ = _generate_json(model_dir, clip, "--fp8-towers", "--decode-workers", "1")
    assert result["frames_decoded"] == 6 and result["new_tokens"] >= 1
    unaligned = tmp_path / "unaligned"  # the default tiny DINO is 40 wide: no layer can run in FP8
    tiny_model("video").save_pretrained(unaligned, include_towers=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (unaligned / name).write_bytes((model_dir / name).read_bytes())
    refused = _longvu("generate", "--model", str(unaligned), "--video", clip, "--question", "?", "--fp8-towers")
    assert refused.returncode == 2
    assert "no linear layer with both sides a multiple of 16" in refused.stderr
    assert "Traceback" not in refused.stderr
