"""Mixtures: LLaVA-NeXT data YAMLs (`datasets:` of json_path + sampling_strategy, as LLaVA-NeXT's
train.py reads them) and lists of manifests with weights, wired into training's dataset builder."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from data.dataset import Sample
from data.mixture import MixtureError, load_mixture, select
from data_helpers import conv, write_image
from train.config import ConfigError, load_run_config
from train.run import build_dataset


def _manifest(path, n, tag, image=None):
    rows = [{"id": f"{tag}{i}", "conversations": conv(f"<image>\nQ{i}" if image else f"Q{i}", "A"),
             **({"image": image} if image else {})} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def sources(tmp_path):
    a = _manifest(tmp_path / "llava_video.jsonl", 10, "a")
    (tmp_path / "vc2").mkdir()
    write_image(str(tmp_path / "vc2" / "x.png"))
    b = _manifest(tmp_path / "vc2" / "videochat2.jsonl", 20, "b", image="x.png")
    c = tmp_path / "onevision.json"
    c.write_text(json.dumps([{"id": f"c{i}", "conversations": conv(f"Q{i}", "A")} for i in range(7)]))
    data_yaml = tmp_path / "mix.yaml"
    data_yaml.write_text(f"datasets:\n  - json_path: {a}\n    sampling_strategy: first:50%\n"
                         f"  - json_path: {b}\n    sampling_strategy: random:30%\n"
                         f"  - json_path: {c}\n    sampling_strategy: end:2\n")
    return a, b, str(c), str(data_yaml)


def test_llava_next_data_yaml(sources):
    a, b, c, data_yaml = sources
    mix = load_mixture(data_yaml, seed=1)
    assert mix.counts() == {"llava_video": 5, "videochat2": 6, "onevision": 2}
    ids = [r["id"] for r in mix.records]
    assert ids[:5] == ["a0", "a1", "a2", "a3", "a4"] and ids[-2:] == ["c5", "c6"]
    assert [r["id"] for r in load_mixture(data_yaml, seed=1).records] == ids  # deterministic under the seed
    assert [r["id"] for r in load_mixture(data_yaml, seed=2).records] != ids  # random:30% reshuffles
    assert mix.roots[5].endswith("vc2") and mix.roots[0] == mix.roots[-1]  # each source's own folder


def test_list_of_manifests_with_weights(sources):
    a, b, c, _ = sources
    mix = load_mixture([{"json_path": a, "weight": 2}, {"path": b, "weight": 0.5}, c], seed=0)
    assert mix.counts() == {"llava_video": 20, "videochat2": 10, "onevision": 7}
    assert sorted(r["id"] for r in mix.records[:20]) == sorted([f"a{i}" for i in range(10)] * 2)


def test_select_strategies():
    rng = np.random.default_rng(0)
    assert select(10, "all", 1.0, rng).tolist() == list(range(10))
    assert select(10, "first:3", 1.0, rng).tolist() == [0, 1, 2]
    assert select(10, "end:25%", 1.0, rng).tolist() == [7, 8, 9]  # ceil(2.5)
    assert len(select(10, "random:4", 1.5, rng)) == 6
    assert select(10, "first:50", 1.0, rng).tolist() == list(range(10))  # capped at the source's size


@pytest.mark.parametrize("spec, match", [
    ([{"json_path": "a.jsonl", "sampling_strategy": "some:3"}], "sampling_strategy 'some:3'"),
    ([{"json_path": "a.jsonl", "weight": 0}], "weight must be a positive number"),
    ([{"file": "a.jsonl"}], r"data.train_manifest\[0\]: expected a manifest path"),
])
def test_bad_mixtures_are_config_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config(None, [f"data.train_manifest={json.dumps(spec)}"])


def test_bad_data_yaml_names_the_file(tmp_path):
    (tmp_path / "mix.yaml").write_text("sources: []\n")
    with pytest.raises(MixtureError, match=r"mix.yaml: expected 'datasets:'"):
        load_mixture(str(tmp_path / "mix.yaml"), 0)


def test_training_builds_the_mixture_and_its_position_survives_resume(sources, tmp_path, qwen_tokenizer):
    *_, data_yaml = sources
    config = load_run_config(None, [f"data.train_manifest={data_yaml}", f"training.output_dir={tmp_path / 'run'}",
                                    "training.seed=5", "data.max_tokens_per_batch=400", "data.per_device_batch_size=2"])
    model_config = SimpleNamespace(tokenizer_model_max_length=512, siglip_image_size=28, dino_image_size=28,
                                   image_token_len=144, lowres_token=8, highres=True)
    dataset, sampler, counts, media_bound = build_dataset(config, qwen_tokenizer, model_config)
    assert counts == {"llava_video": 5, "videochat2": 6, "onevision": 2} and len(dataset) == 13
    image_index = next(i for i, r in enumerate(dataset.records) if "image" in r)
    assert isinstance(dataset[image_index], Sample)  # its media root is its own manifest's folder
    batches = list(sampler)
    frames = [sum(m.siglip.shape[0] for m in dataset[i].media) for i in range(len(dataset))]  # decoded
    assert 0 < max(sum(frames[i] for i in b) for b in batches) <= media_bound  # the memory plan's bound holds
    # a resumed run rebuilds the same mixture and the sampler continues at the same batch
    dataset2, sampler2, _, _ = build_dataset(config, qwen_tokenizer, model_config)
    assert [r["id"] for r in dataset2.records] == [r["id"] for r in dataset.records]
    sampler2.resume_at(0, consumed=2)
    sampler2.set_epoch(0)
    assert list(sampler2) == batches[2:]
