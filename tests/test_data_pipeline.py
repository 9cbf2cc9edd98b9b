"""Dataset, collator, bad-sample tracking, length estimates and the sampler."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from data.bad_samples import BadSampleTracker, TooManyBadSamples, track_bad_samples
from data.collate import NON_MODEL_KEYS, Collator
from data.dataset import DataConfig, LongVUDataset, Sample, SkippedSample
from data.metadata import MetadataCache, estimate_lengths
from data.sampler import ModalityLengthBatchSampler, sampler_inputs
from data.video import SamplingConfig
from data_helpers import conv, frame_indices, write_image, write_video
from longvu.compression import frame_token_bound, visual_token_bound
from longvu.config import LongVUConfig
from longvu.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from longvu.processing import FrameSize, preprocess_frames


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_video(str(root / "clip.mp4"), n_frames=90, fps=30, height=48, width=64)  # 3 s
    write_image(str(root / "a.png"), height=30, width=40)
    write_image(str(root / "b.jpg"), height=20, width=20, seed=1)
    return root


def _records():
    return [
        {"id": "img", "image": "a.png", "conversations": conv("<image>\nWhat is it?", "Noise.")},
        {"id": "vid", "video": "clip.mp4", "start": 1.0, "conversations": conv("<video>\nWhat happens?", "Grey.")},
        {"id": "txt", "conversations": conv("Hi there", "Hello!")},
        {"id": "two", "image": ["b.jpg", "a.png"], "conversations": conv("<image><image>\nSame?", "No.")},
        {"id": "gone", "video": "missing.mp4", "conversations": conv("<video>\nQ", "A")},
    ]


@pytest.fixture()
def dataset(media, qwen_tokenizer, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    cfg = DataConfig(str(manifest), str(media), model_max_length=256, siglip_size=55, dino_size=54)
    return LongVUDataset(cfg, qwen_tokenizer)


def test_dataset_samples(dataset, media):
    img, vid, txt, two, gone = (dataset[i] for i in range(5))
    assert isinstance(img, Sample) and img.sample_id == "img"
    assert [m.kind for m in img.media] == ["image"] and img.media[0].size == FrameSize(30, 40)
    assert img.media[0].siglip.shape == (1, 3, 55, 55) and img.media[0].dino.shape == (1, 3, 54, 54)
    # the video from 1 s at 1 fps: frames 30 and 60, preprocessed exactly like the decoded pixels
    assert vid.media[0].size == FrameSize(48, 64) and vid.frames_decoded == 2
    from data.video import decode_video

    decoded = decode_video(str(media / "clip.mp4"), SamplingConfig(), start=1.0)
    assert frame_indices(decoded.frames) == [30, 60]
    siglip, dino = preprocess_frames(decoded.frames, 55, 54)
    assert torch.equal(vid.media[0].siglip, siglip) and torch.equal(vid.media[0].dino, dino)
    assert txt.media == [] and IMAGE_TOKEN_INDEX not in txt.input_ids.tolist()
    assert [m.size for m in two.media] == [FrameSize(20, 20), FrameSize(30, 40)]
    assert two.input_ids.tolist().count(IMAGE_TOKEN_INDEX) == 2
    assert isinstance(gone, SkippedSample) and gone.code == "missing_file" and gone.sample_id == "gone"
    assert gone.path == str(media / "missing.mp4")


def test_collator_mixed_batch(dataset):
    items = [dataset[i] for i in (3, 2, 4, 1, 0)]  # multi-image, text, bad, video, image
    batch = Collator()(items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4
    assert batch["sample_ids"] == ["two", "txt", "vid", "img"]
    assert batch["media_kinds"] == ["image", "image", "video", "image"]  # placeholder order
    assert batch["media_sizes"] == [FrameSize(20, 20), FrameSize(30, 40), FrameSize(48, 64), FrameSize(30, 40)]
    assert [t.shape[0] for t in batch["pixel_values_siglip"]] == [1, 1, 2, 1]
    assert all(t.shape[1:] == (3, 54, 54) for t in batch["pixel_values_dino"])
    assert batch["frames_decoded"].tolist() == [2, 0, 2, 1]
    assert [s.sample_id for s in batch["skipped"]] == ["gone"]
    lengths = [len(items[i].input_ids) for i in (0, 1, 3, 4)]
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["input_ids"][row, n:] == 151643).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert torch.equal(batch["input_ids"][1, : lengths[1]], items[1].input_ids)
    # text-only batch: no media at all, no dummy image
    text_only = Collator()([dataset[2]])
    assert text_only["pixel_values_siglip"] == [] and text_only["media_kinds"] == []
    assert IMAGE_TOKEN_INDEX not in text_only["input_ids"].tolist()[0]
    assert set(NON_MODEL_KEYS) <= set(batch)


def test_dataloader_with_workers_and_tracker(dataset):
    loader = DataLoader(dataset, batch_size=5, num_workers=1, collate_fn=Collator())
    tracker = BadSampleTracker(max_bad_fraction=0.5, min_samples=1)
    batches = list(track_bad_samples(loader, tracker))
    assert len(batches) == 1 and "skipped" not in batches[0]
    assert tracker.summary() == {"seen": 5, "bad": 1, "by_code": {"missing_file": 1}}


def test_tracker_aborts_past_the_limit(caplog):
    bad = SkippedSample(7, "r7", "corrupt_video", "truncated", "/x.mp4")
    tracker = BadSampleTracker(max_bad_fraction=0.1, min_samples=20)
    tracker.update(9, [bad])  # 10% of 10, but under min_samples
    assert "r7" in caplog.text and "corrupt_video" in caplog.text
    tracker.update(10, [])
    with pytest.raises(TooManyBadSamples, match=r"3 of 22 samples .*corrupt_video"):
        tracker.update(0, [bad, bad])
    # a batch whose samples were all bad is counted, then dropped
    tracker = BadSampleTracker(max_bad_fraction=1.0)
    empty = Collator()([bad])
    assert empty["input_ids"].shape == (0, 0)
    assert list(track_bad_samples([empty], tracker)) == [] and tracker.bad == 1


def test_visual_token_estimates():
    img_cfg, vid_cfg = LongVUConfig(image_token_len=576, highres=False), LongVUConfig(image_token_len=144)
    assert frame_token_bound(576, 384, 384) == 24 * 25 == 600
    assert visual_token_bound(img_cfg, "image", 1, 384, 384, 100) == 600
    # 320x568: ceil(12 * 320/568) + 1 = 8 rows of the 12x12 grid; the other orientation gives more
    assert frame_token_bound(144, 320, 568) == max(12 * 9, 8 * 13) == 108
    # a video is capped by the budget 8192 - 16 - text
    assert visual_token_bound(vid_cfg, "video", 10, 12, 12, 100) == 10 * 156
    assert visual_token_bound(vid_cfg, "video", 1000, 12, 12, 100) == 8192 - 16 - 100
    with pytest.raises(ValueError, match="square"):
        frame_token_bound(150, None, None)


def test_length_estimates_from_metadata(media, tmp_path):
    records = _records()
    cache_file = tmp_path / "meta.json"
    est = estimate_lengths(records, str(media), SamplingConfig(), LongVUConfig(), MetadataCache(cache_file),
                           progress=False)
    assert [e.modality if e else None for e in est] == ["image", "video", "text", "image", None]
    assert est[1].visual_tokens == 2 * frame_token_bound(144, 48, 64)  # 2 frames from 1 s
    assert est[2].visual_tokens == 0 and est[2].text_tokens > 0
    assert est[3].visual_tokens == frame_token_bound(144, 20, 20) + frame_token_bound(144, 30, 40)
    assert len(json.loads(cache_file.read_text())) == 3  # clip, a.png, b.jpg
    again = estimate_lengths(records, str(media), SamplingConfig(), LongVUConfig(), MetadataCache(cache_file),
                             progress=False)
    assert [e.total if e else None for e in again] == [e.total if e else None for e in est]
    lengths, mods = sampler_inputs(est)
    assert mods == ["image", "video", "text", "image", "unknown"] and lengths[4] == 1
    assert lengths[:4] == [e.text_tokens + e.visual_tokens for e in est[:4]]


def _sampler_data(n=300):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(50, 2000, (n,), generator=g).tolist()
    mods = [("image", "video", "text")[i % 3] for i in range(n)]
    lengths[5] = 9000  # longer than the budget alone
    return lengths, mods


def test_sampler_budget_modality_and_coverage():
    lengths, mods = _sampler_data()
    s = ModalityLengthBatchSampler(lengths, mods, max_tokens=8192, max_batch_size=8, seed=3)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each once
    for b in batches:
        assert len({mods[i] for i in b}) == 1
        assert len(b) <= 8
        assert len(b) * max(lengths[i] for i in b) <= 8192 or len(b) == 1
    assert [5] in batches
    assert len(batches) == len(s)
    # deterministic per (seed, epoch); another epoch reshuffles
    assert list(ModalityLengthBatchSampler(lengths, mods, 8192, 8, seed=3)) == batches
    s.set_epoch(1)
    assert list(s) != batches


def test_sampler_distributed_and_resume():
    lengths, mods = _sampler_data()
    ranks = [ModalityLengthBatchSampler(lengths, mods, 8192, 8, seed=1, rank=r, world_size=3) for r in range(3)]
    per_rank = [list(r) for r in ranks]
    assert len({len(p) for p in per_rank}) == 1  # equal step counts
    seen = Counter(i for p in per_rank for b in p for i in b)
    assert set(seen) == set(range(len(lengths)))  # all covered; padding only repeats whole batches
    full = ranks[1].all_batches()
    assert per_rank[1][:5] == full[1::3][:5]
    ranks[1].resume_at(0, consumed=4 * 3)  # 4 steps of 3 ranks
    ranks[1].set_epoch(0)
    assert list(ranks[1]) == per_rank[1][4:] and len(ranks[1]) == len(per_rank[1]) - 4
    with pytest.raises(ValueError, match="rank"):
        ModalityLengthBatchSampler(lengths, mods, 8192, 8, rank=3, world_size=3)


@pytest.mark.parametrize("record", [
    {"id": "square_image", "image": "sq.png", "conversations": conv("<image>\nWhat is it?", "Noise.")},
    {"id": "long_video", "video": "long.mp4", "conversations": conv("<video>\nWhat happens?", "Grey.")},
])
def test_data_side_length_equals_the_models_sequence(record, qwen_tokenizer, tmp_path):
    """One budget: the validator's length for a record (exact text, `visual_token_bound` from the model
    config) equals the sequence the model splices for it, for an image and for a video long enough that
    the model's token budget caps it."""
    from data.collate import Collator
    from data.validate import ValidateConfig, check_record
    from longvu.tiny import tiny_model

    write_image(str(tmp_path / "sq.png"), height=32, width=32)
    write_video(str(tmp_path / "long.mp4"), n_frames=40, fps=1, height=32, width=32)
    model = tiny_model("video", tokenizer_model_max_length=600, drop_threshold=2.0)  # nothing dropped by STC
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(record) + "\n")
    cfg = DataConfig(str(manifest), str(tmp_path), model_max_length=600, siglip_size=55, dino_size=54,
                     sampling=SamplingConfig(max_side=None))
    batch = Collator()([LongVUDataset(cfg, qwen_tokenizer)[0]])
    batch = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    with torch.no_grad():
        prepared = model.prepare_multimodal_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                   batch["pixel_values_siglip"], batch["pixel_values_dino"],
                                                   batch["media_sizes"], batch["media_kinds"])
    checked = check_record(record, 0, ValidateConfig(media_root=str(tmp_path), sampling=SamplingConfig(max_side=None),
                                                     model=model.config), qwen_tokenizer)
    assert not checked.problems
    assert checked.tokens == prepared.stats.sequence_lengths[0]
    # the training run's estimate (exact text through the metadata cache) is the same sequence length
    est = estimate_lengths([record], str(tmp_path), SamplingConfig(max_side=None), model.config, progress=False,
                           tokenizer=qwen_tokenizer)
    assert est[0].total == prepared.stats.sequence_lengths[0]


class _CountingTokenizer:
    """Wraps the real tokenizer; counts the strings it is asked to tokenise (no fast-path backend)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, 0
        self._longvu_fingerprint = "counting"

    def __call__(self, texts, **kwargs):
        self.texts += len(texts)
        return self.tokenizer(texts, **kwargs)


def test_exact_text_lengths_are_the_datasets_and_are_counted_once_per_conversation(media, qwen_tokenizer, tmp_path):
    """With a tokenizer the estimate's text is the dataset's own token count (multi-turn, a system turn,
    truncation at model_max_length, placeholders excluded), far below the character heuristic; a
    conversation the dataset rejects is unusable with its reason; the counts are cached in the
    metadata file, so a resumed run tokenises nothing, and ranks share them (probe_shared)."""
    from data.metadata import probe_shared
    from longvu.processing import tokenize_conversation

    long_answer = " ".join(["The grey frame stays still."] * 400)  # ~2.4K tokens: past model_max_length
    records = [
        {"id": "img", "image": "a.png", "conversations": conv("<image>\nWhat is it?", "A noisy picture of grey dots.")},
        {"id": "multi", "conversations": [{"from": "system", "value": "Answer briefly."}, *conv("Hi", "Hello!"),
                                          *conv("And now?", "Still here.")]},
        {"id": "long", "conversations": conv("Describe it.", long_answer)},
        {"id": "bad", "conversations": [{"from": "gpt", "value": "an answer first"}]},
    ]
    cfg = LongVUConfig(tokenizer_model_max_length=1024)
    cache_file = tmp_path / "meta.json"
    counting = _CountingTokenizer(qwen_tokenizer)
    est = estimate_lengths(records, str(media), SamplingConfig(), cfg, MetadataCache(cache_file), progress=False,
                           tokenizer=counting)
    heuristic = estimate_lengths(records, str(media), SamplingConfig(), cfg, progress=False)
    for rec, e in zip(records[:3], est):
        ids = tokenize_conversation(qwen_tokenizer, rec["conversations"], int("image" in rec), 1024).input_ids
        assert e.text_tokens == len(ids) - int("image" in rec)
    assert est[2].text_tokens == 1024 and est[3] is None
    assert est[0].visual_tokens == heuristic[0].visual_tokens == frame_token_bound(144, 30, 40)
    assert est[1].text_tokens < heuristic[1].text_tokens
    first = counting.texts
    assert first > 0
    again = estimate_lengths(records, str(media), SamplingConfig(), cfg, MetadataCache(cache_file), progress=False,
                             tokenizer=counting)
    assert counting.texts == first  # all from the cache file
    assert [e and e.total for e in again] == [e and e.total for e in est]
    # two ranks (here one after the other), each counting only its share, sharing them through the file
    shared = tmp_path / "shared.json"
    for rank in (0, 1):
        probe_shared(records, str(media), SamplingConfig(), MetadataCache(shared), rank, 2, None, counting)
    tokenised = counting.texts - first
    merged = estimate_lengths(records, str(media), SamplingConfig(), cfg, MetadataCache(shared), progress=False,
                              tokenizer=counting)
    assert counting.texts == first + tokenised and tokenised == first  # each conversation counted once
    assert [e and e.total for e in merged] == [e and e.total for e in est]
