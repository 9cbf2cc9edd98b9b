"""Multimodal sequence packing (`data.packing`): a packed row trains exactly as the unpacked batch
(loss, gradients, logits, each sample's compression), the collator flags packs, the sampler packs on
its length estimates. Tiny model, fp32, CPU."""

from __future__ import annotations

import inspect

import pytest
import torch

from longvu.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from longvu.tiny import tiny_model
from test_model import media

IM, PAD, VOCAB = IMAGE_TOKEN_INDEX, 0, 4096


def _batch(samples):
    """[(token ids, [(n_frames, seed, (h, w), kind)], n_prompt)] -> right-padded model inputs; labels
    score everything after the first n_prompt tokens except placeholders."""
    width = max(len(ids) for ids, _, _ in samples)
    ids = torch.full((len(samples), width), PAD)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b, (seq, _, prompt) in enumerate(samples):
        row = torch.tensor(seq)
        ids[b, :len(seq)], mask[b, :len(seq)] = row, 1
        labels[b, prompt:len(seq)] = row[prompt:].masked_fill(row[prompt:] == IM, IGNORE_INDEX)
    items = [item for _, sample_items, _ in samples for item in sample_items]  # batch order, as the model reads them
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, **media(items)}


def _text(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# an image sample, a long video that the text budget compresses, a text-only sample, a two-image sample
MIXED = [
    ([1] + _text(5, 0) + [IM] + _text(20, 1), [(1, 1, (50, 30), "image")], 6),
    ([1] + _text(3, 2) + [IM] + _text(40, 3), [(24, 2, (40, 64), "video")], 10),
    ([1] + _text(30, 4), [], 8),
    ([1, IM] + _text(4, 5) + [IM] + _text(12, 6), [(1, 3, (48, 48), "image"), (1, 4, (30, 60), "image")], 7),
]


def _model():
    # a short context, so that the video's visual budget (and so its compression) depends on its text
    return tiny_model("video", vocab_size=VOCAB, pad_token_id=PAD, tokenizer_model_max_length=900).train()


def _run(model, batch, pack: bool):
    model.zero_grad()
    out = model(**batch, pack_sequences=pack, return_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("samples", [MIXED, MIXED[2:3] + MIXED[2:3], MIXED[:1]], ids=["mixed", "text", "one"])
def test_packed_row_trains_as_the_unpacked_batch(samples):
    model = _model()
    batch = _batch(samples)
    unpacked, grads = _run(model, batch, pack=False)
    packed, packed_grads = _run(model, batch, pack=True)

    assert packed.media.sequence_lengths == unpacked.media.sequence_lengths
    assert packed.media.visual_tokens == unpacked.media.visual_tokens  # each sample compressed as unpacked
    assert packed.media.regimes == unpacked.media.regimes and packed.media.frames_kept == unpacked.media.frames_kept
    torch.testing.assert_close(packed.loss, unpacked.loss, rtol=0, atol=1e-5)
    assert grads.keys() == packed_grads.keys()
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=0, atol=1e-5, msg=name)
    lengths = unpacked.media.sequence_lengths
    assert packed.logits.shape[:2] == (1, sum(lengths))
    for b, part in enumerate(packed.logits[0].split(lengths)):  # attention confined to each sample
        torch.testing.assert_close(part, unpacked.logits[b, :lengths[b]], rtol=0, atol=1e-5)


def test_the_mixed_pack_exercises_budget_dependent_compression():
    """Guards the test above: the video sample's tokens are cut to its own text budget."""
    out = _model()(**_batch(MIXED))
    video = out.media.regimes[1]
    assert "stc" in video or video == "mix", out.media.regimes


def test_packed_inputs_restart_positions_per_sample_and_never_score_across_samples():
    model = _model()
    batch = _batch(MIXED)
    with torch.no_grad():
        unpacked = model.prepare_multimodal_inputs(
            batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values_siglip"],
            batch["pixel_values_dino"], batch["media_sizes"], batch["media_kinds"])
        packed = model.prepare_multimodal_inputs(
            batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values_siglip"],
            batch["pixel_values_dino"], batch["media_sizes"], batch["media_kinds"], pack=True)
    lengths = unpacked.sequence_lengths
    assert packed.attention_mask is None and packed.inputs_embeds.shape[:2] == (1, sum(lengths))
    assert packed.position_ids[0].tolist() == [p for n in lengths for p in range(n)]
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    assert (packed.labels[0, starts] == IGNORE_INDEX).all()
    for b, (emb, lab) in enumerate(zip(packed.inputs_embeds[0].split(lengths), packed.labels[0].split(lengths))):
        torch.testing.assert_close(emb, unpacked.inputs_embeds[b, :lengths[b]], rtol=0, atol=0)
        assert torch.equal(lab[1:], unpacked.labels[b, 1:lengths[b]])


# --- sampler, collator, trainer ------------------------------------------------------------------


def test_packing_sampler_fills_packs_up_to_the_budget_on_its_estimates():
    from data.sampler import ModalityLengthBatchSampler, PackingBatchSampler

    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(100, 3000, (300,), generator=rng).tolist() + [9000]  # one longer than the budget
    budget = 8192
    packs = PackingBatchSampler(lengths, budget, seed=3).all_batches()
    flat = sorted(i for p in packs for i in p)
    assert flat == list(range(len(lengths)))  # every sample once
    for p in packs:
        assert sum(lengths[i] for i in p) <= budget or p == [300]
    assert [300] in packs
    lower_bound = -(-sum(lengths) // budget)
    assert len(packs) <= lower_bound + 2  # first-fit decreasing comes close to the minimum
    padded = ModalityLengthBatchSampler(lengths, ["video"] * len(lengths), budget, 64, seed=3).all_batches()
    assert len(packs) < len(padded)
    assert PackingBatchSampler(lengths, budget, seed=3).all_batches() == packs  # deterministic
    assert PackingBatchSampler(lengths, budget, seed=4).all_batches() != packs
    ranks = [list(PackingBatchSampler(lengths, budget, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) and {tuple(p) for r in ranks for p in r} == {tuple(p) for p in packs}


def test_the_media_bound_holds_for_every_batch_of_both_samplers_and_is_tight_on_uniform_records():
    """The memory plan's connector term: no batch of either sampler, over several epochs, holds more
    frames and images than `batch_media_bound`; a wide image (few tokens, all its queries) counts."""
    from data.sampler import ModalityLengthBatchSampler, PackingBatchSampler, batch_media_bound

    rng = torch.Generator().manual_seed(1)
    n = 400
    lengths = torch.randint(200, 3000, (n,), generator=rng).tolist() + [12000]  # the last alone in its batch
    media = torch.randint(0, 5, (n,), generator=rng).tolist() + [900]  # a long video: 900 frames
    media[:40] = [4] * 40  # four wide images in few tokens
    lengths[:40] = [4 * 210 + 30] * 40
    budget = 8192
    packed = batch_media_bound(lengths, media, budget)
    unpacked = batch_media_bound(lengths, media, budget, max_batch_size=4)
    assert packed == unpacked == 900  # the long video alone
    assert batch_media_bound(lengths[:-1], media[:-1], budget, max_batch_size=4) == 16  # four of 4
    assert batch_media_bound(lengths[:-1], media[:-1], budget) > 16
    for epoch in range(3):
        for sampler, bound in ((PackingBatchSampler(lengths, budget, seed=epoch), packed),
                               (ModalityLengthBatchSampler(lengths, ["image"] * len(lengths), budget, 4, seed=epoch),
                                unpacked)):
            sampler.set_epoch(epoch)
            worst = max(sum(media[i] for i in b) for b in sampler.all_batches())
            assert worst <= bound
    uniform = batch_media_bound([870] * 100, [4] * 100, budget)
    assert uniform == 9 * 4 + 2  # 9 whole records (7,830 tokens), then 362 / 870 of a tenth: 1.66, rounded up
    assert batch_media_bound([870] * 100, [4] * 100, budget, max_batch_size=3) == 12
    assert batch_media_bound([100, 100], [0, 0], budget) == 0
    with pytest.raises(ValueError, match="media counts"):
        batch_media_bound([1, 2], [1], budget)


def test_collator_flags_packs_and_the_trainer_runs_them_packed(tmp_path):
    from transformers import TrainingArguments

    from data.bad_samples import BadSampleTracker
    from data.collate import Collator
    from data.dataset import Sample
    from data.sampler import PackingBatchSampler
    from train.config import RunConfig
    from train.trainer import LongVUTrainer

    samples = [Sample(i, f"t{i}", torch.tensor(_text(10 + 5 * i, i)), torch.tensor(_text(10 + 5 * i, i)), [])
               for i in range(4)]
    assert "pack_sequences" not in Collator()(samples[:2]) and Collator(pack=True)(samples[:2])["pack_sequences"]
    seen = []
    model = _model()
    model.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["pack_sequences"], kw["input_ids"].shape[0],
                                                                   kw["attention_mask"].sum().item())),
                                    with_kwargs=True)
    config = RunConfig()
    config.data.num_workers = 0
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, remove_unused_columns=False)
    sampler = PackingBatchSampler([len(s.input_ids) for s in samples], max_tokens=50)  # lengths 10..25: packs 25+20, 15+10
    trainer = LongVUTrainer(model=model, args=args, train_dataset=samples, data_collator=Collator(pad_id=PAD, pack=True),
                            run_config=config, batch_sampler=sampler, bad_tracker=BadSampleTracker(0.5, 100))
    trainer.train()
    assert sorted(seen) == [(True, 2, 25), (True, 2, 45)]
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(h["loss"] > 0 for h in logged)


@pytest.mark.slow
def test_packed_zero3_run_with_mixed_packs_on_two_ranks_completes(tmp_path):
    """`longvu train` with data.packing under real 2-process ZeRO-3 on CPU: packs mixing image, video and
    text samples train in step on both ranks (no hang), with the policy's plan and kernels logged."""
    import json

    from data.synthetic import write_synthetic_dataset
    from test_train import TEXT_RECORD, ZERO3, Run, _config

    manifest = write_synthetic_dataset(tmp_path / "media", n_images=2, n_videos=2, video_seconds=4)
    records = [json.loads(line) for line in manifest.read_text().splitlines()] + [TEXT_RECORD]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = _config(manifest, tmp_path / "out", zero=ZERO3, data={"packing": True, "max_tokens_per_batch": 1500},
                  training={"activation_checkpointing": "auto", "max_steps": 2, "save_steps": 100,
                            "save_at_end": False})
    run = Run(cfg, tmp_path / "work").run(timeout=600).check_ok()
    logged = [h for h in run.summary["log_history"] if "loss" in h]
    assert len(logged) == 2 and all(0 < h["loss"] < 20 and h["data_wait_s"] >= 0 for h in logged)
    assert "activation checkpointing full: 2 decoder layers recomputed" in run.log  # auto without a GPU
    assert "fused kernels: none (training.fused_kernels auto)" in run.log


# --- sdpa_varlen: packed rows through the variable-length kernel -----------------------------------


def _reference_varlen(query, key, value, bounds, longest, scale, window=None):
    """Causal attention span by span with plain SDPA (over the last `window` keys if given), in fp32:
    query [T, Hq, D], key/value [T, Hkv, D]."""
    groups = query.shape[1] // key.shape[1]
    out = []
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        assert end - start <= longest
        q, k, v = (t[start:end].transpose(0, 1).float() for t in (query, key, value))
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        pos = torch.arange(end - start)
        allowed = (pos[None] <= pos[:, None]) & ((pos[:, None] - pos[None] < window) if window else True)
        out.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
                   .transpose(0, 1))
    return torch.cat(out).to(query.dtype)


def test_sdpa_varlen_trains_a_packed_row_as_the_unpacked_batch_and_passes_each_sample_bound(monkeypatch):
    """The CUDA kernel is replaced by a span-by-span reference; what is checked is our side: the bounds
    the forward passes (one span per sample), that HF builds no [T, T] mask for them (the attention
    function refuses a mask beside bounds), the [B, H, T, D] <-> [T, H, D] layout with fewer key/value
    heads, and that an unpacked batch (padding mask) under sdpa_varlen is plain SDPA (the kernel never
    called)."""
    import longvu.packed_attention as pa

    calls = []

    def kernel(query, key, value, bounds, longest, scale, window):
        calls.append((bounds.tolist(), longest, tuple(query.shape), tuple(key.shape), window))
        return _reference_varlen(query, key, value, bounds, longest, scale, window)

    monkeypatch.setattr(pa, "_flash_varlen", kernel)
    reference = _model()
    varlen = _model()
    varlen.config._attn_implementation = pa.VARLEN_ATTENTION
    assert varlen.config.num_key_value_heads < varlen.config.num_attention_heads  # GQA exercised
    batch = _batch(MIXED)
    unpacked, grads = _run(reference, batch, pack=False)
    again, again_grads = _run(varlen, batch, pack=False)
    assert calls == []
    torch.testing.assert_close(again.loss, unpacked.loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(again_grads[name], grads[name], rtol=0, atol=0, msg=name)
    packed, packed_grads = _run(varlen, batch, pack=True)
    lengths = unpacked.media.sequence_lengths
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    heads, kv_heads = varlen.config.num_attention_heads, varlen.config.num_key_value_heads
    head_dim = varlen.config.hidden_size // heads
    assert calls == [(bounds, max(lengths), (sum(lengths), heads, head_dim), (sum(lengths), kv_heads, head_dim),
                      None)] * varlen.config.num_hidden_layers
    torch.testing.assert_close(packed.loss, unpacked.loss, rtol=0, atol=1e-5)
    assert grads.keys() == packed_grads.keys()
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("form", ["gqa", "2.11", "is_causal"])
def test_flash_varlen_adapts_gqa_scale_and_window_to_each_form_of_torchs_kernel(monkeypatch, form):
    """varlen_attn's keyword arguments differ by torch release: window_size/scale/enable_gqa (after
    2.11), window_size/scale (2.11, no GQA), is_causal only (before; equal head counts, scale
    1/sqrt(D), no sliding window); each gives the reference result (bf16, the kernel's dtypes)."""
    import longvu.packed_attention as pa

    def window_of(window_size):
        assert window_size[1] == 0
        return None if window_size[0] < 0 else window_size[0] + 1

    def gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        assert enable_gqa == (k.shape[1] != q.shape[1]) and torch.equal(cu_q, cu_k)
        return _reference_varlen(q, k, v, cu_q, max_q, scale, window_of(window_size))

    def torch_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        assert k.shape[1] == q.shape[1]
        return _reference_varlen(q, k, v, cu_q, max_q, scale, window_of(window_size))

    def is_causal(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False):
        assert is_causal and k.shape[1] == q.shape[1]
        return _reference_varlen(q, k, v, cu_q, max_q, q.shape[-1] ** -0.5)

    kernel = {"gqa": gqa, "2.11": torch_2_11, "is_causal": is_causal}[form]
    monkeypatch.setattr(pa, "_kernel", lambda: (kernel, frozenset(inspect.signature(kernel).parameters)))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(11, h, 8, generator=g).bfloat16() for h in (6, 2, 2))
    bounds = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    for scale in (8 ** -0.5, 0.2):
        for window in (None, 3):
            expected = _reference_varlen(q, k, v, bounds, 6, scale, window)
            if form == "is_causal" and window:
                with pytest.raises(ValueError, match="no window_size"):
                    pa._flash_varlen(q, k, v, bounds, 6, scale, window)
                continue
            got = pa._flash_varlen(q, k, v, bounds, 6, scale, window)
            torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=2e-2)
    assert not torch.allclose(_reference_varlen(q, k, v, bounds, 6, 0.2, 3).float(),
                              _reference_varlen(q, k, v, bounds, 6, 0.2).float(), atol=2e-2)  # the window matters
    with pytest.raises(ValueError, match="fp16 or bf16"):
        pa._flash_varlen(q.float(), k.float(), v.float(), bounds, 6, 0.2)


def test_sdpa_varlen_is_refused_without_cuda_and_in_fp32(monkeypatch):
    import train.model_setup as setup
    from train.config import ConfigError, RunConfig

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine")
    assert setup.resolve_attention("auto") == "sdpa"
    with pytest.raises(ConfigError, match="sdpa_varlen needs a CUDA GPU"):
        setup.resolve_attention("sdpa_varlen")
    monkeypatch.setattr(setup, "varlen_available", lambda: True)  # as on a GPU without flash-attn
    assert setup.resolve_attention("auto") == "sdpa_varlen" and setup.resolve_attention("auto", "fp16") == "sdpa_varlen"
    assert setup.resolve_attention("auto", "fp32") == "sdpa"  # the varlen kernel takes fp16/bf16 only
    config = RunConfig()
    config.model.attn_implementation, config.model.dtype = "sdpa_varlen", "fp32"
    with pytest.raises(ConfigError, match="runs in fp16 or bf16: set model.dtype bf16"):
        setup.load_model(config)
