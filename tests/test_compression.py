"""The compression pipeline's functions (longvu/compression.py) on hand-built inputs, and against
slow plain-Python implementations of the reference rules (spec §3.2) written here."""

from __future__ import annotations

import math
import random

import pytest
import torch

from longvu.compression import (
    Regime,
    cap_frames,
    choose_regime,
    frame_budget,
    frame_text_scores,
    highres_frame_count,
    mix_resolutions,
    select_frames,
    spatial_token_compression,
    visual_budget,
    window_mean_similarity,
)

# --- plain-Python references (lists of floats, float64) ---------------------------------------


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _cos(a, b):
    return _dot(a, b) / (math.sqrt(_dot(a, a)) * math.sqrt(_dot(b, b)))


def ref_window_similarities(frames: list[list[float]], window: int) -> list[float]:
    """Spec §3.2(a)4: per window, s_i = mean_j cos(i, j) (self included), middle frame set to 0."""
    sims = []
    for start in range(0, len(frames), window):
        seg = frames[start:start + window]
        s = [sum(_cos(a, b) for b in seg) / len(seg) for a in seg]
        s[len(seg) // 2] = 0.0
        sims.extend(s)
    return sims


def ref_select(frames, window, threshold, cap):
    """Frames kept by the reference: s_i < threshold, then >cap -> int(i * (n / cap))."""
    kept = [i for i, s in enumerate(ref_window_similarities(frames, window)) if s < threshold]
    if len(kept) > cap:
        interval = len(kept) / float(cap)
        kept = [kept[int(interval * i)] for i in range(cap)]
    return kept


def ref_stc(frames: list[list[list[float]]], threshold: float, budget: int, chunk: int) -> list[list[float]]:
    """Spec §3.2(c): anchor keeps all tokens; others keep token p iff cos(x_fp, x_0p) < threshold;
    over budget -> remove ceil(excess / n_chunks) from the end of every chunk (x[:-cut]); then [:budget]."""
    chunks = []
    for start in range(0, len(frames), chunk):
        group = frames[start:start + chunk]
        toks = list(group[0])
        for f in group[1:]:
            toks += [tok for p, tok in enumerate(f) if _cos(tok, group[0][p]) < threshold]
        chunks.append(toks)
    total = sum(len(c) for c in chunks)
    if total > budget:
        cut = math.ceil((total - budget) / len(chunks))
        chunks = [c[:-cut] for c in chunks]
    out = [tok for c in chunks for tok in c]
    return out[:budget]


def _as_lists(t: torch.Tensor):
    return t.double().tolist()


# --- temporal reduction -------------------------------------------------------------------


def test_identical_frames_keep_only_each_window_middle():
    frames = torch.randn(1, 5, 3).expand(40, 5, 3).contiguous()
    sims = window_mean_similarity(frames, 16)
    assert sims.shape == (40,)
    kept = select_frames(sims, 0.83, 400)
    # windows of 16, 16, 8 -> middles 8, 16 + 8, 32 + 4
    assert kept.tolist() == [8, 24, 36]


def test_frame_unlike_the_others_is_kept():
    base = torch.zeros(16, 4)
    base[:, 0] = 1.0
    base[3] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # orthogonal to the other 15
    sims = window_mean_similarity(base, 16)
    assert sims[3].item() == pytest.approx(1 / 16)  # only itself
    assert sims[0].item() == pytest.approx(15 / 16)
    assert select_frames(sims, 0.83, 400).tolist() == [3, 8]


def test_threshold_is_strict():
    # four orthogonal unit frames: each mean cosine is exactly 1/4; the middle (index 2) gets 0
    frames = torch.eye(4)
    sims = window_mean_similarity(frames, 4)
    assert sims.tolist() == [0.25, 0.25, 0.0, 0.25]
    assert select_frames(sims, 0.25, 400).tolist() == [2]  # 0.25 < 0.25 is false
    assert select_frames(sims, 0.2500001, 400).tolist() == [0, 1, 2, 3]


def test_tail_window_uses_its_own_length_and_middle():
    frames = torch.ones(18, 6)  # windows of 16 and a tail of 2
    sims = window_mean_similarity(frames, 16)
    # tail: frame 16 averages over the 2 tail frames (cos 1 each) -> 1, not 2/16; its middle is index 17
    assert sims[16].item() == pytest.approx(1.0)
    assert sims[17].item() == 0.0
    assert select_frames(sims, 0.83, 400).tolist() == [8, 17]
    # a tail of one frame is its own middle and is kept
    assert select_frames(window_mean_similarity(torch.ones(17, 6), 16), 0.83, 400).tolist() == [8, 16]
    # fewer frames than one window: a single short window
    assert select_frames(window_mean_similarity(torch.ones(5, 6), 16), 0.83, 400).tolist() == [2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_matches_plain_python_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    n, window = 77, 16
    # groups of near-duplicate frames so that similarities spread around the threshold
    bases = torch.randn(12, 3, 8, generator=gen)
    group = torch.randint(0, 12, (n,), generator=gen)
    frames = bases[group] + 0.6 * torch.rand(1, generator=gen) * torch.randn(n, 3, 8, generator=gen)
    flat = [f.reshape(-1).double().tolist() for f in frames]
    ref_sims = ref_window_similarities(flat, window)
    ours = window_mean_similarity(frames, window)
    assert ours.tolist() == pytest.approx(ref_sims, abs=1e-5)
    # thresholds away from any similarity (no float ties), from keeping few to keeping most
    for q in (0.2, 0.5, 0.8):
        threshold = sorted(ref_sims)[int(q * n)] + 1e-4
        if any(abs(s - threshold) < 1e-5 for s in ref_sims):
            continue
        for cap in (400, 10):
            expected = ref_select(flat, window, threshold, cap)
            assert select_frames(ours, threshold, cap).tolist() == expected


def test_cap_frames_1000_to_400():
    indices = torch.arange(1000) * 3 + 7
    capped = cap_frames(indices, 400)
    assert capped.shape == (400,)
    assert capped.tolist() == [int(i * 1000 / 400) * 3 + 7 for i in range(400)]
    assert cap_frames(indices[:400], 400).tolist() == indices[:400].tolist()  # at the cap: untouched


@pytest.mark.parametrize("n", [401, 410, 777, 999, 1234, 3600])
def test_cap_frames_matches_reference_rule(n):
    # the reference: interval = n / float(400); [int(interval * i) for i in range(400)]
    interval = n / float(400)
    assert cap_frames(torch.arange(n), 400).tolist() == [int(interval * i) for i in range(400)]


# --- budget and regime --------------------------------------------------------------------


def test_visual_budget_worked_example():
    # spec §3.2 worked example: 60-token prompt -> B = 8192 - 60 - 16 = 8116
    assert visual_budget(8192, 16, 60) == 8116
    assert visual_budget(8192, 16, 9000) == -824  # negative, as in the reference
    assert frame_budget(8116, 64) == 126
    assert frame_budget(8116, 144) == 56
    assert frame_budget(-824, 64) == 1 and frame_budget(10, 144) == 1  # max(1, B // tokens)


def test_choose_regime_worked_example_and_discontinuity():
    budget = 8116  # maxF_hi = 56, maxF_lo = 126
    assert choose_regime(55, budget, 144, 64) is Regime.HIGH  # F' < maxF_hi
    assert choose_regime(56, budget, 144, 64) is Regime.MIX
    assert choose_regime(100, budget, 144, 64) is Regime.MIX
    assert choose_regime(126, budget, 144, 64) is Regime.MIX
    assert choose_regime(127, budget, 144, 64) is Regime.HIGH  # the discontinuity at F' = 127
    assert choose_regime(400, budget, 144, 64) is Regime.HIGH


def test_choose_regime_negative_budget_is_high():
    # B < 0: both frame limits are max(1, .) = 1, so any F' >= 2 exceeds the low-res limit -> HIGH
    for n in (2, 3, 50, 400):
        assert choose_regime(n, -500, 144, 64) is Regime.HIGH


def test_highres_frame_count_worked_example():
    # 16:9 as the code computes: 84 hi / 40 lo tokens per frame; budget 8116 (text tokens only)
    k = highres_frame_count(8116, 100, 40, 84)
    assert k == (8116 - 100 * 40) // 44 == 93
    assert k * 84 + (100 - k) * 40 == 8092
    # square F' = 126: the low-res total 126 * 72 = 9072 exceeds the budget -> nothing upgraded
    assert highres_frame_count(8116, 126, 72, 156) == 0
    assert highres_frame_count(9072, 126, 72, 156) == 0  # budget must exceed the low-res total
    assert highres_frame_count(9073, 126, 72, 156) == 0  # 1 // 84
    assert highres_frame_count(9072 + 84, 126, 72, 156) == 1
    assert highres_frame_count(10**6, 7, 72, 156) == 7  # capped at F'
    assert highres_frame_count(10**6, 7, 72, 72) == 0  # no gain per frame


# --- hi/lo mixing ----------------------------------------------------------------------------


def test_mix_resolutions_picks_highres_rows_in_order():
    n, t_lo, t_hi = 6, 3, 5
    # value = (frame, resolution flag, token index)
    lowres = torch.tensor([[[f, 0, p] for p in range(t_lo)] for f in range(n)], dtype=torch.float32)
    highres = torch.tensor([[[f, 1, p] for p in range(t_hi)] for f in range(n)], dtype=torch.float32)
    upgraded = torch.tensor([1, 4])
    out = mix_resolutions(lowres, highres, upgraded)
    expected = []
    for f in range(n):
        expected += [[f, 1, p] for p in range(t_hi)] if f in (1, 4) else [[f, 0, p] for p in range(t_lo)]
    assert out.tolist() == expected
    # none upgraded / all upgraded
    assert mix_resolutions(lowres, highres, torch.tensor([], dtype=torch.long)).tolist() == lowres.reshape(-1, 3).tolist()
    assert mix_resolutions(lowres, highres, torch.arange(n)).tolist() == highres.reshape(-1, 3).tolist()


def test_frame_text_scores_dot_vs_cosine():
    # frame 0: large, 45 degrees off the text; frame 1: small, aligned with the text
    lowres = torch.tensor([[[10.0, 10.0], [10.0, 10.0]], [[0.5, 0.0], [0.5, 0.0]]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    dot = frame_text_scores(lowres, text, dot_product=True)
    cos = frame_text_scores(lowres, text, dot_product=False)
    assert dot.tolist() == pytest.approx([10.0, 0.5])
    assert cos.tolist() == pytest.approx([1 / math.sqrt(2), 1.0])
    assert int(dot.argmax()) == 0 and int(cos.argmax()) == 1


def test_frame_text_scores_dot_is_mean_of_pairwise_dots():
    gen = torch.Generator().manual_seed(3)
    lowres, text = torch.randn(4, 5, 6, generator=gen), torch.randn(7, 6, generator=gen)
    ref = [sum(_dot(v, t) for v in frame for t in text.tolist()) / (5 * 7) for frame in lowres.tolist()]
    assert frame_text_scores(lowres, text, True).tolist() == pytest.approx(ref, abs=1e-5)


# --- spatial token compression ---------------------------------------------------------------


def test_stc_drops_tokens_equal_to_the_anchor_and_keeps_orthogonal_ones():
    t, c = 4, 4
    anchor = torch.eye(c)[:t]  # token p = e_p
    frames = anchor.expand(3, t, c).clone()
    frames[2, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # orthogonal to the anchor's e_1
    out = spatial_token_compression(frames, threshold=0.7, budget=10**6, chunk=8)
    assert out.tolist() == anchor.tolist() + [[1.0, 0.0, 0.0, 0.0]]


def test_stc_chunk_of_one_frame_is_kept_whole():
    frames = torch.ones(9, 3, 2)  # chunk 0: 8 identical frames; chunk 1: one frame
    out = spatial_token_compression(frames, threshold=0.7, budget=10**6, chunk=8)
    assert out.shape == (6, 2)  # anchor of chunk 0 (3) + the single frame of chunk 1 (3)


def test_stc_newlines_dropped_from_non_anchor_frames():
    gen = torch.Generator().manual_seed(0)
    f, rows, cols, c = 3, 2, 3, 8
    newline = torch.randn(c, generator=gen)
    grid = torch.randn(f, rows, cols, c, generator=gen)
    frames = torch.cat([grid, newline.expand(f, rows, 1, c)], dim=2).reshape(f, rows * (cols + 1), c)
    out = spatial_token_compression(frames, threshold=0.99, budget=10**6, chunk=8)
    is_newline = (out == newline).all(dim=1)
    assert int(is_newline.sum()) == rows  # only the anchor's newlines survive
    assert out.shape[0] == rows * (cols + 1) + (f - 1) * rows * cols  # random tokens are all kept


def test_stc_force_trim_cuts_the_end_of_every_chunk_then_slices():
    # 3 chunks (8 + 8 + 4 frames), orthogonal frames so nothing is dropped by similarity
    t = 2
    n = 20
    frames = torch.zeros(n, t, n * t)
    for f in range(n):
        for p in range(t):
            frames[f, p, f * t + p] = 1.0  # one-hot, id = f * t + p
    chunk_sizes = [16, 16, 8]  # tokens per chunk
    total, budget = 40, 27
    cut = math.ceil((total - budget) / 3)  # 5
    expected_ids = []
    start = 0
    for size in chunk_sizes:
        expected_ids += list(range(start, start + size - cut))
        start += size
    expected_ids = expected_ids[:budget]  # 11 + 11 + 3 = 25 <= 27
    out = spatial_token_compression(frames, threshold=0.5, budget=budget, chunk=8)
    assert out.argmax(dim=1).tolist() == expected_ids
    # slicing after the trim: a budget the trim overshoots is still respected exactly
    out = spatial_token_compression(frames, threshold=0.5, budget=38, chunk=8)
    ids = [i for s, size in zip((0, 16, 32), chunk_sizes) for i in range(s, s + size - 1)][:38]
    assert out.argmax(dim=1).tolist() == ids


def test_stc_negative_budget_uses_python_slicing():
    t, n = 2, 16
    frames = torch.zeros(n, t, n * t)
    for f in range(n):
        for p in range(t):
            frames[f, p, f * t + p] = 1.0
    ids = list(range(n * t))  # 2 chunks of 16 tokens
    for budget in (-3, -20, 0):
        cut = math.ceil((32 - budget) / 2)
        trimmed = ids[:16][:-cut] + ids[16:][:-cut]
        out = spatial_token_compression(frames, threshold=0.5, budget=budget, chunk=8)
        assert out.argmax(dim=1).tolist() == trimmed[:budget]


@pytest.mark.parametrize("seed", range(6))
def test_stc_matches_plain_python_reference(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n, t, c = rng.randint(1, 27), rng.randint(1, 7), 5
    # frames that drift from a base so cosines to the anchor spread over [-1, 1]
    base = torch.randn(1, t, c, generator=gen)
    frames = base + rng.uniform(0.2, 2.0) * torch.randn(n, t, c, generator=gen)
    threshold = rng.uniform(-0.2, 0.95)
    chunk = rng.choice([8, 8, 3])
    lists = _as_lists(frames)
    # avoid float ties at the threshold
    for s in range(0, n, chunk):
        for f in range(s + 1, min(s + chunk, n)):
            for p in range(t):
                if abs(_cos(lists[f][p], lists[s][p]) - threshold) < 1e-5:
                    pytest.skip("cosine tie at the threshold")
    kept_all = len(ref_stc(lists, threshold, 10**9, chunk))
    for budget in {10**9, kept_all, kept_all - 1, kept_all // 2, rng.randint(-kept_all, kept_all), 0}:
        expected = ref_stc(lists, threshold, budget, chunk)
        out = spatial_token_compression(frames, threshold, budget, chunk)
        assert out.shape == (len(expected), c)
        if expected:
            torch.testing.assert_close(out.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)
