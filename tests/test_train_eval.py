"""`training.eval`: eval loss and MCQ accuracy on a held-out manifest every eval_steps, logged with
the other metrics, and the best checkpoint by that metric kept beyond keep_last (a 1-process
DeepSpeed run on the CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.config import ConfigError, load_run_config
from train.evaluation.train_eval import letter_token_ids, mcq_indices

REPO = Path(__file__).resolve().parents[1]


def test_mcq_indices_and_letters(qwen_tokenizer):
    recs = [{"options": ["a", "b"], "answer": "B"}, {"options": ["a"], "answer": "B"}, {"answer": "A"},
            {"options": ["a", "b", "c"], "answer": "AB"}, {"options": ["x", "y", "z"], "answer": "C"}]
    assert mcq_indices(recs) == [0, 4]
    ids = letter_token_ids(qwen_tokenizer, 4)
    assert [qwen_tokenizer.decode([i]) for i in ids] == ["A", "B", "C", "D"]


def test_best_metric_is_checked(tmp_path):
    (tmp_path / "m.jsonl").write_text("")
    with pytest.raises(ConfigError, match="best_metric"):
        load_run_config(None, [f"data.train_manifest={tmp_path / 'm.jsonl'}", "training.eval.best_metric=acc"])
    with pytest.raises(ConfigError, match="needs training.eval.manifest"):
        load_run_config(None, [f"data.train_manifest={tmp_path / 'm.jsonl'}", "training.eval.best_metric=loss"])


@pytest.mark.slow
def test_training_logs_eval_loss_and_mcq_accuracy(tmp_path):
    from data.synthetic import write_synthetic_dataset

    manifest = write_synthetic_dataset(tmp_path / "data", 2, 2)
    held = [json.loads(line) for line in manifest.read_text().splitlines()]
    for rec in held:  # the clips' answers become MCQ records: options + answer letter
        if "video" in rec:
            rec["options"], rec["answer"] = ["one", "two", "three"], "B"
            rec["conversations"][0]["value"] += "\n(A) one\n(B) two\n(C) three"
            rec["conversations"][1]["value"] = "B"
    (tmp_path / "data" / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    out = tmp_path / "run"
    cfg = {"stage": "custom", "model": {"init": "tiny:video", "dtype": "fp32",
                                         "overrides": {"tokenizer_model_max_length": 1024}},
           "data": {"train_manifest": str(manifest), "max_tokens_per_batch": 4096, "num_workers": 0},
           "training": {"output_dir": str(out), "max_steps": 3, "save_steps": 1, "keep_last": 1, "report_to": [],
                        "learning_rate": 1e-3, "eval": {"manifest": str(tmp_path / "data" / "held.jsonl"),
                                                        "eval_steps": 1, "best_metric": "mcq_accuracy"}},
           "deepspeed": str(REPO / "configs/deepspeed/zero2.json"), "launch": {"nproc": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "train", "train", str(tmp_path / "run.yaml")], cwd=REPO,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    evals = [h for h in summary["log_history"] if "eval_loss" in h]
    assert [h["step"] for h in evals] == [1, 2, 3]
    assert all(h["eval_mcq_n"] == 2 and h["eval_mcq_accuracy"] in (0.0, 50.0, 100.0) for h in evals)
    accs = [h["eval_mcq_accuracy"] for h in evals]
    best = 1 + accs.index(max(accs))  # the Trainer keeps the first of equal bests
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept == sorted({f"checkpoint-{best}", "checkpoint-3"})
