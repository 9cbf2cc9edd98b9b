"""The lmms-eval model adapter: `lmms_eval --model longvu` (found through lmms-eval's entry-point
registry) runs a local task written at test time, `generate_until` and loglikelihood
(`multiple_choice`) kinds, on a tiny exported model and real decoded videos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("CI"):  # CI installs the eval extra: a missing lmms-eval there is a failure, not a skip
    import lmms_eval  # noqa: F401
else:
    pytest.importorskip("lmms_eval")

REPO = Path(__file__).resolve().parents[1]

UTILS = '''
import os

ROOT = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    return [os.path.join(ROOT, doc["video"])]


def doc_to_text(doc):
    options = "\\n".join(f"({chr(65 + i)}) {o}" for i, o in enumerate(doc["options"]))
    return f"Question: {doc['question']}\\nOptions:\\n{options}\\nAnswer with the option's letter."


def doc_to_choice(doc):
    return [chr(65 + i) for i in range(len(doc["options"]))]


def process_results(doc, results):
    return {"exact": float(results[0].strip()[:1] == doc["answer"])}
'''

GEN_YAML = """task: longvu_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["<|im_end|>"]
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""

MC_YAML = """task: longvu_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: "{{{{['A', 'B', 'C'].index(answer)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from data.synthetic import write_scene_video

    root = tmp_path_factory.mktemp("lmms_tasks")
    docs = []
    for i in range(2):
        write_scene_video(root / f"v{i}.mp4", seconds=3, fps=10, height=48, width=64, n_scenes=2, seed=i)
        docs.append({"video": f"v{i}.mp4", "question": f"What happens in clip {i}?", "options": ["x", "y", "z"],
                     "answer": "B"})
    (root / "docs.json").write_text(json.dumps(docs))
    (root / "utils.py").write_text(UTILS)
    (root / "gen.yaml").write_text(GEN_YAML.format(data=root / "docs.json"))
    (root / "mc.yaml").write_text(MC_YAML.format(data=root / "docs.json"))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen_tokenizer):
    from longvu.tiny import tiny_model

    root = tmp_path_factory.mktemp("lmms_model")
    tiny_model("video").save_pretrained(root, include_towers=True)
    qwen_tokenizer.save_pretrained(root)
    return root


def test_registry_finds_longvu():
    from lmms_eval.models import get_model

    from train.evaluation.lmms_model import LongVU

    assert get_model("longvu") is LongVU


def test_lmms_eval_runs_local_tasks(task_dir, model_dir, tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "longvu", "--model_args",
         f"pretrained={model_dir},video_fps=2,max_frames=4", "--tasks", "longvu_tiny_gen,longvu_tiny_mc",
         "--include_path", str(task_dir), "--output_path", str(tmp_path / "out"), "--log_samples"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = list((tmp_path / "out").rglob("*results.json"))
    assert found, proc.stdout[-2000:]
    results = json.loads(found[0].read_text())["results"]
    assert set(results) >= {"longvu_tiny_gen", "longvu_tiny_mc"}
    assert 0.0 <= results["longvu_tiny_mc"]["acc,none"] <= 1.0
    samples = list((tmp_path / "out").rglob("*longvu_tiny_gen*.jsonl"))
    assert samples and len(samples[0].read_text().splitlines()) == 2
