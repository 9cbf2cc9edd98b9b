"""Long-video inference path: uint8 frames preprocessed per chunk on the model's device give the same
tokens as preprocessed pixels (fp32, CPU), no stage sees more than a chunk of frames, progress is
reported, candidate features beyond the device limit are gathered exactly, and compiled towers pad
their chunks to one static size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import longvu.visual as visual
from longvu.constants import IMAGE_TOKEN_INDEX
from longvu.media_cache import MediaCache
from longvu.processing import preprocess_frames
from longvu.tiny import TINY_DINO_PIXELS, TINY_SIGLIP_PIXELS, tiny_model

IDS = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, 8, 9]])


def clip(n: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, 48, 64, 3]: a few scenes with every 5th frame replaced by noise, so that DINO's
    window selection keeps some frames and drops others."""
    from data.synthetic import scene_frames

    frames = scene_frames(n, 48, 64, n_scenes=4, seed=seed)
    noise = np.random.default_rng(seed).integers(0, 256, frames[::5].shape, dtype=np.uint8)
    frames[::5] = noise
    return frames


def raw_media(frames: np.ndarray, kind: str = "video") -> dict:
    u8 = torch.from_numpy(frames)
    return dict(pixel_values_siglip=[u8], pixel_values_dino=[u8], media_sizes=[frames.shape[1:3]], media_kinds=[kind])


def pixel_media(frames: np.ndarray, kind: str = "video") -> dict:
    siglip, dino = preprocess_frames(frames, TINY_SIGLIP_PIXELS, TINY_DINO_PIXELS)
    return dict(pixel_values_siglip=[siglip], pixel_values_dino=[dino], media_sizes=[frames.shape[1:3]],
                media_kinds=[kind])


def prepare(model, media, **kw):
    with torch.no_grad():
        return model.prepare_multimodal_inputs(IDS, None, None, **media, **kw)


@pytest.fixture(scope="module")
def model():
    return tiny_model("video", vocab_size=4096, pad_token_id=0, max_selected_frames=20)


@pytest.mark.parametrize("n,kind", [(150, "video"), (6, "video"), (1, "image")])
def test_raw_frames_give_the_tokens_of_preprocessed_pixels(model, n, kind):
    frames = clip(n)
    got, want = prepare(model, raw_media(frames, kind)), prepare(model, pixel_media(frames, kind))
    assert torch.equal(got.media[0].kept_indices, want.media[0].kept_indices)
    assert torch.equal(got.inputs_embeds, want.inputs_embeds)
    if n == 150:  # selection ran and the cap applied: a real long-video case
        assert got.media[0].kept_indices.numel() == 20


def test_raw_frames_are_preprocessed_one_chunk_at_a_time(model, monkeypatch):
    calls = []
    real = visual.tower_pixels

    def spy(frames, tower, size):
        calls.append((tower, frames.shape[0]))
        return real(frames, tower, size)

    monkeypatch.setattr(visual, "tower_pixels", spy)
    result = prepare(model, raw_media(clip(150)))
    dino = [k for t, k in calls if t == "dino"]
    siglip = [k for t, k in calls if t == "siglip"]
    assert max(dino + siglip) <= 64
    assert sum(dino) == 150 and len(dino) == 3  # every frame once, in 64-frame chunks
    assert sum(siglip) == result.media[0].kept_indices.numel() == 20  # SigLIP only on kept frames


def test_progress_reports_dino_chunks_then_siglip(model):
    seen = []
    cache = MediaCache(progress=lambda stage, done, total: seen.append((stage, done, total)))
    prepare(model, raw_media(clip(150)), media_encoder=cache)
    assert seen == [("dino", 64, 150), ("dino", 128, 150), ("dino", 150, 150), ("siglip", 20, 20)]


def test_gather_rows_across_parts_equals_concatenation():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(k, 3, 2, generator=g) for k in (5, 0, 7, 4)]
    rows = torch.tensor([0, 4, 5, 6, 11, 15])
    got = visual._gather_rows(parts, rows, torch.device("cpu"))
    assert torch.equal(got, torch.cat(parts)[rows])
    assert torch.equal(visual._gather_rows(parts, torch.tensor([2]), torch.device("cpu")), parts[0][2:3])


def test_compiled_tower_pads_every_chunk_to_one_size(model):
    tower = model.model.towers[1]
    pixels = pixel_media(clip(70))["pixel_values_dino"][0]
    eager = tower(pixels)
    shapes = []

    def spy(px):
        shapes.append(px.shape[0])
        return tower._features(px)

    tower._compiled = spy  # stands in for torch.compile's function: the padding logic is ours
    try:
        padded = tower(pixels)
    finally:
        tower._compiled = None
    assert shapes == [64, 64]  # 64 + 6 frames, the second chunk padded
    assert padded.shape == eager.shape
    assert torch.allclose(padded, eager, atol=1e-5)


def test_connector_in_frame_chunks_at_inference_equals_one_call(model, monkeypatch):
    media = raw_media(clip(150))
    whole = prepare(model, media)
    calls = []
    sva = visual._sva
    monkeypatch.setattr(visual, "CONNECT_CHUNK", 8)
    monkeypatch.setattr(visual, "_sva", lambda m, s, d, k: calls.append(s.shape[0]) or sva(m, s, d, k))
    chunked = prepare(model, media)
    assert calls == [8, 8, 4]  # 20 kept frames
    assert torch.allclose(chunked.inputs_embeds, whole.inputs_embeds, atol=1e-6, rtol=0)
    assert torch.equal(chunked.media[0].kept_indices, whole.media[0].kept_indices)


def test_frames_in_one_list_and_pixels_in_the_other_is_one_clear_error(model):
    frames = clip(6)
    media = pixel_media(frames)
    media["pixel_values_dino"] = [torch.from_numpy(frames)]
    with pytest.raises(ValueError, match="uint8 frames .* go in both pixel_values_siglip and pixel_values_dino"):
        prepare(model, media)
