"""LongVUForCausalLM on tiny models: splicing, batching, padding, loss, generation, the 400-frame cap,
the resolution regimes end to end, and error messages. Expected values come from the definitions
(single-sample runs, plain cross-entropy, step-by-step greedy decoding, plain-Python frame selection)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from longvu.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from longvu.tiny import TINY_DINO_PIXELS, TINY_SIGLIP_PIXELS, tiny_model
from longvu.visual import MediaItem, _stream_dino

PAD = 0
IM = IMAGE_TOKEN_INDEX
S, E = 1, 2  # stand-ins for <|im_start|>, <|im_end|>
VOCAB = 4096  # a small vocabulary keeps the full-logit references cheap
SMALL = dict(vocab_size=VOCAB, pad_token_id=PAD)


def frames(n: int, seed: int):
    """Random-noise frames (every frame different): siglip [n,3,55,55], dino [n,3,54,54]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, TINY_SIGLIP_PIXELS, TINY_SIGLIP_PIXELS, generator=g) * 2 - 1,
            torch.rand(n, 3, TINY_DINO_PIXELS, TINY_DINO_PIXELS, generator=g) * 2 - 1)


def media(items):
    """[(n_frames, seed, (h, w), kind)] -> the model's media keyword arguments."""
    out = {"pixel_values_siglip": [], "pixel_values_dino": [], "media_sizes": [], "media_kinds": []}
    for n, seed, size, kind in items:
        s, d = frames(n, seed)
        out["pixel_values_siglip"].append(s)
        out["pixel_values_dino"].append(d)
        out["media_sizes"].append(size)
        out["media_kinds"].append(kind)
    return out


def merge(*ms):
    return {k: sum((m[k] for m in ms), []) for k in ms[0]}


@pytest.fixture(scope="module")
def model():
    return tiny_model("video", **SMALL)


def _pad_batch(seqs, side, value):
    width = max(len(s) for s in seqs)
    rows, mask = [], []
    for s in seqs:
        pad = [value] * (width - len(s))
        rows.append(pad + s if side == "left" else s + pad)
        mask.append([0] * len(pad) + [1] * len(s) if side == "left" else [1] * len(s) + [0] * len(pad))
    return torch.tensor(rows), torch.tensor(mask)


# --- batching -----------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_of_two_equals_two_single_runs(model, side):
    video = media([(6, 1, (40, 64), "video")])
    image = media([(1, 2, (50, 30), "image")])
    ids = [
        [S, 11, 12, IM, 13, 14, 15, 16, E, S, 21, 22, 23, 24],
        [S, 31, IM, 32, 33, E, S, 41, 42, 43, 44, 45, 46, 47, 48, 49],
    ]
    labels = [[IGNORE_INDEX] * 10 + s[10:] for s in ids]
    batch_ids, batch_mask = _pad_batch(ids, side, PAD)
    batch_labels, _ = _pad_batch(labels, side, IGNORE_INDEX)
    both = merge(video, image)
    with torch.no_grad():
        prepared = model.prepare_multimodal_inputs(batch_ids, batch_mask, batch_labels, padding_side=side, **both)
        out = model(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask,
                    position_ids=prepared.position_ids, labels=prepared.labels, return_logits=True)
        total, count = 0.0, 0
        for b, m in enumerate((video, image)):
            single_ids, single_labels = torch.tensor([ids[b]]), torch.tensor([labels[b]])
            single = model.prepare_multimodal_inputs(single_ids, None, single_labels, **m)
            real = prepared.attention_mask[b].bool()
            n = single.inputs_embeds.shape[1]
            assert int(real.sum()) == n
            # padding on the requested side
            assert bool(real[:n].all()) if side == "right" else bool(real[-n:].all())
            assert torch.allclose(prepared.inputs_embeds[b][real], single.inputs_embeds[0], atol=1e-6)
            assert torch.equal(prepared.labels[b][real], single.labels[0])
            assert torch.equal(prepared.position_ids[b][real], torch.arange(n))
            assert bool((prepared.labels[b][~real] == IGNORE_INDEX).all())
            assert bool((prepared.inputs_embeds[b][~real] == 0).all())
            single_out = model(inputs_embeds=single.inputs_embeds, labels=single.labels, return_logits=True)
            assert torch.allclose(out.logits[b][real], single_out.logits[0], atol=1e-4)
            scored = int((single.labels[0, 1:] != IGNORE_INDEX).sum())
            total += single_out.loss.item() * scored
            count += scored
        if side == model.config.tokenizer_padding_side:  # the input_ids route pads on the config's side
            direct = model(input_ids=batch_ids, attention_mask=batch_mask, labels=batch_labels, **both)
            assert direct.loss.item() == pytest.approx(out.loss.item(), abs=1e-6)
    assert out.loss.item() == pytest.approx(total / count, abs=1e-5)


def test_text_only_sample_next_to_a_video_sample(model):
    ids = [[S, 5, 6, 7, 8, 9], [S, 11, IM, 12, 13]]
    batch_ids, mask = _pad_batch(ids, "right", PAD)
    video = media([(5, 3, (48, 48), "video")])
    with torch.no_grad():
        prepared = model.prepare_multimodal_inputs(batch_ids, mask, None, **video)
        single = model.prepare_multimodal_inputs(torch.tensor([ids[1]]), None, None, **video)
        text_emb = model.model.embed_tokens(torch.tensor(ids[0]))
    assert torch.equal(prepared.attention_mask[0], torch.tensor([1] * 6 + [0] * (prepared.attention_mask.shape[1] - 6)))
    assert torch.allclose(prepared.inputs_embeds[0, :6], text_emb)  # no dummy image spliced in
    n = single.inputs_embeds.shape[1]
    assert torch.allclose(prepared.inputs_embeds[1, :n], single.inputs_embeds[0], atol=1e-6)
    assert len(prepared.media) == 1


def test_a_text_only_batch_runs_the_vision_path_in_eval_only_under_zero3(model):
    """Evaluation under ZeRO-3 (training.eval beside a rank with media) needs the same module calls on
    every rank: the blank-frame pass then runs in eval mode too, adding exactly zero; unpartitioned
    evaluation and generation skip it."""
    calls = []
    hook = model.model.mm_projector.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.tensor([[S, 5, 6, 7, 8, 9]])
    try:
        with torch.no_grad():
            plain = model(input_ids=ids).logits
            assert not model.training and calls == []
            model.model.mm_projector[0].weight.ds_id = 0  # what DeepSpeed's ZeRO-3 partitioning sets
            partitioned = model(input_ids=ids).logits
    finally:
        hook.remove()
        del model.model.mm_projector[0].weight.ds_id
    assert calls == [1]
    assert torch.equal(partitioned, plain)


@pytest.mark.parametrize("towers_train", [False, True])
def test_a_text_only_training_batch_reaches_the_connector_and_runs_trained_towers_only(towers_train):
    """The blank-frame anchor of a text-only training batch gives every connector parameter a (zero)
    gradient and leaves the loss as it is; frozen towers, outside DeepSpeed, are not run for it (a
    compiled tower would run a whole 64-frame chunk), towers that train are."""
    model = tiny_model("video", **SMALL)
    model.model.towers.requires_grad_(towers_train)
    calls = []
    hooks = [t.register_forward_hook(lambda *_: calls.append(1)) for t in model.model.towers]
    ids = torch.tensor([[S, 5, 6, 7, 8, 9]])
    try:
        with torch.no_grad():
            plain = model.eval()(input_ids=ids, labels=ids).loss
        loss = model.train()(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == ([1, 1] if towers_train else [])
    assert torch.equal(loss.detach(), plain)
    connector = [p for n, p in model.named_parameters() if "vision_sampler" in n or "mm_projector" in n]
    assert connector and all(p.grad is not None and not p.grad.any() for p in connector)


def test_an_empty_cache_from_the_caller_is_the_one_filled(model):
    """A fresh DynamicCache() is empty, hence falsy: it must still be used, not replaced by a new one."""
    from transformers import DynamicCache

    from longvu.modeling import CACHE_NAME

    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([[S, 5, 6, 7]]), use_cache=True, **{CACHE_NAME: cache})
    assert cache.get_seq_length() == 4


def test_two_images_in_one_sample(model):
    images = media([(1, 4, (48, 32), "image"), (1, 5, (30, 60), "image")])
    ids = torch.tensor([[S, 3, IM, 4, 5, IM, 6, 7, 8]])
    with torch.no_grad():
        prepared = model.prepare_multimodal_inputs(ids, None, None, **images)
        blocks = []
        for j in range(2):
            one = {k: [v[j]] for k, v in images.items()}
            res = model.prepare_multimodal_inputs(torch.tensor([[1, IM, 2]]), None, None, **one)
            blocks.append(res.media[0].tokens)
        emb = model.model.embed_tokens
        expected = torch.cat([emb(torch.tensor([S, 3])), blocks[0], emb(torch.tensor([4, 5])), blocks[1],
                              emb(torch.tensor([6, 7, 8]))])
    # unpadded image grids: (48, 32) -> 12 rows x 8 cols; (30, 60) -> 6 rows x 12 cols
    assert blocks[0].shape[0] == 12 * 9 and blocks[1].shape[0] == 6 * 13
    assert torch.allclose(prepared.inputs_embeds[0], expected, atol=1e-6)
    assert len(prepared.media) == 2


def test_placeholder_media_count_mismatch_raises(model):
    ids = torch.tensor([[1, IM, 2, IM, 3]])
    one = media([(1, 6, (32, 32), "image")])
    with pytest.raises(ValueError, match=r"2 media placeholders.*1 siglip.*1 dino"):
        model.prepare_multimodal_inputs(ids, None, None, **one)
    with pytest.raises(ValueError, match=r"0 media placeholders.*1 siglip"):
        model.prepare_multimodal_inputs(torch.tensor([[1, 2, 3]]), None, None, **one)
    bad = media([(1, 6, (32, 32), "audio")])
    with pytest.raises(ValueError, match="audio"):
        model.prepare_multimodal_inputs(torch.tensor([[1, IM, 2]]), None, None, **bad)
    with pytest.raises(ValueError, match="no pixel values"):
        model(input_ids=ids)


# --- loss and gradients ---------------------------------------------------------------------------


def test_loss_equals_plain_cross_entropy_and_gradients_reach_the_connector_only():
    model = tiny_model("video", **SMALL, seed=3)
    m = media([(4, 7, (40, 56), "video")])
    ids = torch.tensor([[S, 11, IM, 12, 13, E, S, 21, 22, 23, E]])
    labels = torch.tensor([[IGNORE_INDEX] * 7 + [21, 22, 23, E]])
    out = model(input_ids=ids, labels=labels, **m)
    with torch.no_grad():
        prepared = model.prepare_multimodal_inputs(ids, None, labels, **m)
        hidden = model.model(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask,
                             position_ids=prepared.position_ids).last_hidden_state
        logits = hidden @ model.lm_head.weight.t()
        ref = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), prepared.labels[:, 1:].flatten(),
                              ignore_index=IGNORE_INDEX)
    assert prepared.labels.shape[1] > ids.shape[1]  # visual tokens were spliced in, labelled IGNORE
    assert int((prepared.labels != IGNORE_INDEX).sum()) == 4
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-5)
    with torch.no_grad():  # gradient accumulation: the summed loss divided by the given item count
        summed = ref.item() * 4
        by_items = model(input_ids=ids, labels=labels, num_items_in_batch=10, **m).loss
    assert by_items.item() == pytest.approx(summed / 10, abs=1e-5)
    out.loss.backward()
    connector = ["mm_projector.", "mm_projector_aux_0.", "mm_projector_aux_1.", "vision_sampler_0.",
                 "vision_query", "image_newline", "pos_embed_0", "pos_embed_1"]
    for name, p in model.named_parameters():
        if "vision_tower_aux_list" in name:
            assert not p.requires_grad and p.grad is None, name
        elif any(c in name for c in connector):
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


# --- generation -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen_model():
    """Generation limited to ids < 1000; rows >= 1000 of lm_head scaled up so that they would win."""
    model = tiny_model("video", **SMALL, seed=5, generation_vocab_size=1000)
    with torch.no_grad():
        model.lm_head.weight[1000:] *= 50
    return model


def _greedy_reference(model, ids, m, steps, limit):
    """Step-by-step greedy decoding over the full sequence (no cache), restricted to ids < limit."""
    with torch.no_grad():
        prepared = model.prepare_multimodal_inputs(ids, None, None, **m)
        embeds, new, unrestricted = prepared.inputs_embeds, [], []
        for _ in range(steps):
            logits = model(inputs_embeds=embeds).logits[0, -1]
            unrestricted.append(int(logits.argmax()))
            tok = int(logits[:limit].argmax())
            new.append(tok)
            embeds = torch.cat([embeds, model.model.embed_tokens(torch.tensor([[tok]]))], dim=1)
    return new, unrestricted


@pytest.mark.parametrize("kind,n,size", [("image", 1, (40, 56)), ("video", 6, (48, 48))])
def test_generate_runs_vision_once_and_returns_new_tokens(gen_model, kind, n, size):
    m = media([(n, 8, size, kind)])
    ids = torch.tensor([[S, 11, 12, IM, 13, 14, E, S, 15]])
    calls = {"siglip": 0, "dino": 0}
    towers = gen_model.model.vision_tower_aux_list
    hooks = [towers[0].register_forward_hook(lambda *a: calls.__setitem__("siglip", calls["siglip"] + 1)),
             towers[1].register_forward_hook(lambda *a: calls.__setitem__("dino", calls["dino"] + 1))]
    try:
        out = gen_model.generate(ids, do_sample=False, max_new_tokens=5, pad_token_id=PAD, **m)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"siglip": 1, "dino": 1}
    assert out.shape == (1, 5)  # new tokens only
    expected, unrestricted = _greedy_reference(gen_model, ids, m, 5, 1000)
    assert out[0].tolist() == expected
    assert all(t < 1000 for t in out[0].tolist())
    assert all(t >= 1000 for t in unrestricted)  # without the mask, the high ids would have been chosen


def test_generate_batch_with_left_padding_matches_single(gen_model):
    m = media([(1, 9, (40, 40), "image"), (4, 10, (40, 40), "video")])
    ids = [[S, 11, IM, 13], [S, 21, 22, 23, IM, 24, 25]]
    batch_ids, mask = _pad_batch(ids, "left", PAD)
    out = gen_model.generate(batch_ids, attention_mask=mask, do_sample=False, max_new_tokens=3, pad_token_id=PAD, **m)
    for b in range(2):
        one = {k: [v[b]] for k, v in m.items()}
        expected, _ = _greedy_reference(gen_model, torch.tensor([ids[b]]), one, 3, 1000)
        assert out[b].tolist() == expected


# --- frame selection and regimes end to end -------------------------------------------------------


def _ref_window_select(feats: torch.Tensor, window: int, threshold: float) -> list[int]:
    flat = [f.reshape(-1).double() for f in feats]
    flat = [f / f.norm() for f in flat]
    kept = []
    for start in range(0, len(flat), window):
        seg = list(range(start, min(start + window, len(flat))))
        sims = [sum(float(flat[i] @ flat[j]) for j in seg) / len(seg) for i in seg]
        sims[len(seg) // 2] = 0.0
        kept += [i for i, s in zip(seg, sims) if s < threshold]
    return kept


def test_frame_cap_end_to_end_with_reference_selection():
    model = tiny_model("video", **SMALL, max_selected_frames=40)
    n = 100
    m = media([(n, 11, (48, 48), "video")])
    ids = torch.tensor([[S, 1, IM, 2, 3]])
    with torch.no_grad():
        feats = model.model.vision_tower_aux_list[1](m["pixel_values_dino"][0])
    kept = _ref_window_select(feats, 16, model.config.dino_threshold)
    assert len(kept) > 40  # the cap applies
    expected = [kept[int(i * len(kept) / 40)] for i in range(40)]
    seen = []
    hook = model.model.vision_tower_aux_list[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            prepared = model.prepare_multimodal_inputs(ids, None, None, **m)
    finally:
        hook.remove()
    assert prepared.media[0].kept_indices.tolist() == expected
    # SigLIP ran on exactly the kept frames
    assert len(seen) == 1 and torch.equal(seen[0], m["pixel_values_siglip"][0][expected])


def test_frame_cap_400_on_all_different_frames():
    # dino_threshold > 1: every mean cosine is <= 1, so all 420 frames survive the windows and the cap of
    # 400 picks int(i * 420 / 400). (DINO only: the rest of the pipeline is covered at a cap of 40 above.)
    model = tiny_model("video", **SMALL, dino_threshold=1.01)
    assert model.config.max_selected_frames == 400
    s, d = frames(420, 12)
    item = MediaItem(s, d, 48, 48, True, regime_budget=1000, token_budget=1001)
    feats, indices = _stream_dino(model.model, item)
    assert indices.tolist() == [int(i * 420 / 400) for i in range(400)]
    assert feats.shape == (400, 576, 40)
    # the kept features are those of the kept frames (spot check)
    with torch.no_grad():
        ref = model.model.vision_tower_aux_list[1](d[[0, 105, 418]])  # int(399 * 1.05) = 418
    assert torch.allclose(feats[[0, 100, 399]], ref, atol=1e-5)


def test_no_selection_below_the_frame_budget():
    # B = 1024 - 5 - 16 = 1003 -> maxF_sel = 15; 14 identical frames are all kept (no temporal reduction)
    model = tiny_model("video", **SMALL)
    s, d = frames(1, 13)
    m = {"pixel_values_siglip": [s.expand(14, -1, -1, -1)], "pixel_values_dino": [d.expand(14, -1, -1, -1)],
         "media_sizes": [(48, 48)], "media_kinds": ["video"]}
    with torch.no_grad():
        res = model.prepare_multimodal_inputs(torch.tensor([[1, 2, IM, 3, 4]]), None, None, **m).media[0]
        assert res.kept_indices.tolist() == list(range(14))
        m["pixel_values_siglip"], m["pixel_values_dino"] = [s.expand(15, -1, -1, -1)], [d.expand(15, -1, -1, -1)]
        res = model.prepare_multimodal_inputs(torch.tensor([[1, 2, IM, 3, 4]]), None, None, **m).media[0]
    assert res.kept_indices.tolist() == [7]  # 15 >= maxF_sel: identical frames -> only the middle (15 // 2)


def test_regime_discontinuity_end_to_end():
    # 8 ids -> regime budget 1024 - 8 - 16 = 1000: maxF_hi = 6, maxF_lo = 15
    model = tiny_model("video", **SMALL, dino_threshold=1.01)
    ids = torch.tensor([[S, 1, 2, IM, 3, 4, 5, 6]])
    regimes = {}
    with torch.no_grad():
        for n in (5, 6, 15, 16):
            res = model.prepare_multimodal_inputs(ids, None, None, **media([(n, 14, (48, 48), "video")])).media[0]
            assert res.kept_indices.tolist() == list(range(n))
            regimes[n] = res.regime
    # 5 frames: high-res, 5 * 156 = 780 <= 1001 tokens, no STC; 6 and 15: mix (6 * 72 = 432 -> upgrades;
    # 15 * 72 = 1080 > 1001 -> no upgrade, STC on low-res); 16 > 15: all high-res, then STC
    assert regimes == {5: "high", 6: "mix", 15: "mix+stc", 16: "high+stc"}


@pytest.mark.parametrize("swap,per_frame", [(False, 78), (True, 84)])
def test_video_size_swap_switch(swap, per_frame):
    # (H, W) = (36, 64): read correctly 6 rows x 12 cols (78 tokens); swapped as the original, 12 x 6 (84)
    model = tiny_model("video", **SMALL, compat_swap_video_hw=swap)
    with torch.no_grad():
        res = model.prepare_multimodal_inputs(torch.tensor([[1, IM, 2, 3, 4, 5, 6, 7]]), None, None,
                                              **media([(3, 15, (36, 64), "video")])).media[0]
    assert res.regime == "high"
    assert res.tokens.shape[0] == 3 * per_frame


@pytest.mark.parametrize("lowres_image,expected", [(False, 156), (True, 72)])
def test_single_image_lowres_switch(lowres_image, expected):
    model = tiny_model("video", **SMALL, compat_lowres_single_image=lowres_image)
    with torch.no_grad():
        res = model.prepare_multimodal_inputs(torch.tensor([[1, IM, 2]]), None, None,
                                              **media([(1, 16, (32, 32), "image")])).media[0]
    assert res.tokens.shape[0] == expected


def test_image_family_gives_576_query_grid():
    model = tiny_model("image", **SMALL)
    with torch.no_grad():
        res = model.prepare_multimodal_inputs(torch.tensor([[1, IM, 2]]), None, None,
                                              **media([(1, 17, (32, 32), "image")])).media[0]
    assert res.tokens.shape == (24 * 25, 64)


@pytest.fixture(scope="module")
def full_vocab_model():
    return tiny_model("video")


def test_frame_scoring_text_excludes_the_answer(full_vocab_model):
    # 10 frames, 76 text tokens: B = 1024 - 76 - 16 -> maxF_hi 6 <= 10 <= maxF_lo 14: MIX, k = 2.
    # A training sample: <|im_start|>user\n<image>\n{q}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>
    model = full_vocab_model
    m = media([(10, 18, (48, 48), "video")])
    question = list(range(100, 115))
    header = [151645, 198, 151644, 77091, 198]  # <|im_end|>\n<|im_start|>assistant\n

    def run(ids, n_answer):
        labels = [IGNORE_INDEX] * (len(ids) - n_answer) + ids[len(ids) - n_answer:]
        with torch.no_grad():
            res = model.prepare_multimodal_inputs(torch.tensor([ids]), None, torch.tensor([labels]), **m).media[0]
        assert res.regime == "mix" and len(res.highres_frames) == 2
        return tuple(res.highres_frames)

    tokens = (500, 900, 1234)
    # precondition: the same 50 tokens inside the question (same length, same budgets) change the picks
    in_question = {run([151644, 872, 198, IM, 198] + question + [a] * 50 + header + [151645], 1) for a in tokens}
    assert len(in_question) > 1
    # as the answer, they must not
    as_answer = {run([151644, 872, 198, IM, 198] + question + header + [a] * 50 + [151645], 51) for a in tokens}
    assert len(as_answer) == 1


def test_forward_and_generate_report_what_the_visual_pipeline_did(model):
    """The output carries the media stats (no state left on the model): per item frames in / kept,
    visual tokens equal to the spliced span, the regime; per sequence the spliced length."""
    ids = [[S, 11, IM, 12, 13], [S, 5, 6, 7]]
    batch_ids, mask = _pad_batch(ids, "right", PAD)
    video = media([(5, 3, (48, 48), "video")])
    labels = batch_ids.masked_fill(batch_ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
    model.train()
    try:
        out = model(input_ids=batch_ids, attention_mask=mask, labels=labels, **video)
        text_only = model(input_ids=torch.tensor([ids[1]]), labels=torch.tensor([ids[1]]))
    finally:
        model.eval()
    stats = out.media
    assert not hasattr(model, "last_batch_stats")
    assert stats.frames_in == [5] and len(stats.frames_kept) == 1 and 1 <= stats.frames_kept[0] <= 5
    assert stats.sequence_lengths == [4 + stats.visual_tokens[0], 4]
    assert stats.regimes[0] in ("high", "mix", "Regime.HIGH", "Regime.MIX")
    assert text_only.media.sequence_lengths == [4] and text_only.media.visual_tokens == []
    gen = model.generate(torch.tensor([ids[0]]), do_sample=False, max_new_tokens=2, pad_token_id=PAD,
                         return_dict_in_generate=True, **video)
    assert gen.sequences.shape == (1, 2) and gen.media.visual_tokens == stats.visual_tokens


def test_images_and_short_clips_share_dino_calls_with_the_features_of_separate_calls(monkeypatch):
    """Items that keep every frame (images, clips under the frame budget) are batched into DINO calls
    of up to its chunk size (one call for a batch of images, not one per image); every item's features
    equal those of its own call. A clip that selects frames, and one past the chunk size, run on their own."""
    from longvu.visual import vision_features

    model = tiny_model("video", **SMALL)
    dino = model.model.vision_tower_aux_list[1]
    monkeypatch.setattr(type(dino), "chunk_size", 8)
    shapes = [(1, "image"), (3, "video"), (1, "image"), (20, "video"), (2, "image"), (4, "video"), (9, "video")]
    items = []
    for k, (n, kind) in enumerate(shapes):
        s, d = frames(n, 40 + k)
        budget = 1000 if n != 20 else 30  # the 20-frame clip selects frames
        items.append(MediaItem(s, d, 48, 48, kind == "video", regime_budget=budget, token_budget=budget + 1))
    calls = []
    hook = dino.register_forward_hook(lambda mod, args, out: calls.append(out.shape[0]))
    try:
        with torch.no_grad():
            batched = vision_features(model.model, items)
    finally:
        hook.remove()
    # [1 + 3 + 1] in one call; the selecting clip alone (chunk by chunk); [2 + 4] in one; the 9-frame clip alone
    assert calls[0] == 5 and calls[-2:] == [6, 9], calls
    with torch.no_grad():
        alone = [vision_features(model.model, [item])[0] for item in items]
    for i, (a, b) in enumerate(zip(batched, alone)):
        assert torch.equal(a.kept, b.kept), i
        assert torch.allclose(a.hi, b.hi, atol=1e-5) and torch.allclose(a.lo, b.lo, atol=1e-5), i


def test_frozen_dino_interpolates_its_position_embeddings_once_per_size(monkeypatch):
    """The tiny DINO (74 px native) at 54 px interpolates its position grid: the result is computed once
    and reused while the embeddings are frozen and unchanged; a weight update recomputes it, and the
    features always equal those of a fresh interpolation."""
    import longvu.towers as towers

    model = tiny_model("video", **SMALL)
    dino = model.model.vision_tower_aux_list[1]
    _, d = frames(2, 7)
    real = towers.F.interpolate
    count = []
    monkeypatch.setattr(towers.F, "interpolate", lambda *a, **k: count.append(1) or real(*a, **k))
    first = dino(d)
    second = dino(d)
    assert len(count) == 1 and torch.equal(first, second)
    with torch.no_grad():
        dino.vision_tower.embeddings.position_embeddings.mul_(1.5)  # e.g. weights loaded in place
    third = dino(d)
    assert len(count) == 2 and not torch.allclose(third, first)
    dino.vision_tower.embeddings._frozen_pos = None
    assert torch.equal(dino(d), third)  # a fresh interpolation gives the same features
