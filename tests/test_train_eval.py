"""`training.eval`: eval loss and MCQ accuracy on a held-out manifest every eval_steps, logged with
the other metrics, and the best checkpoint by that metric kept beyond keep_last (a 1-process
DeepSpeed run on the CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from longvu.constants import IGNORE_INDEX
from train.config import ConfigError, load_run_config
from train.evaluation.train_eval import letter_token_ids, mcq_accuracy, mcq_indices

REPO = Path(__file__).resolve().parents[1]


def test_mcq_indices_and_letters(qwen_tokenizer):
    recs = [{"options": ["a", "b"], "answer": "B"}, {"options": ["a"], "answer": "B"}, {"answer": "A"},
            {"options": ["a", "b", "c"], "answer": "AB"}, {"options": ["x", "y", "z"], "answer": "C"}]
    assert mcq_indices(recs) == [0, 4]
    ids = letter_token_ids(qwen_tokenizer, 4)
    assert [qwen_tokenizer.decode([i]) for i in ids] == ["A", "B", "C", "D"]


class _LetterTokenizer:
    """Token id of a letter = its code point ("A" -> 65)."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


class _AlwaysA(torch.nn.Module):
    """Logits [1, 1, 128] with "A" highest; records each forward's input_ids [1, L]."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, input_ids, logits_to_keep=0, **media):
        self.calls.append(input_ids[0].tolist())
        logits = torch.zeros(1, 1, 128)
        logits[0, 0, ord("A")] = 1.0
        return SimpleNamespace(logits=logits)


class _Dataset:
    """Four MCQ records (gold A, A, B, A); the indices in `failing` fail to load."""

    def __init__(self, failing):
        self.records = [{"options": ["x", "y", "z"], "answer": a} for a in "AABA"]
        self.failing = failing

    def __getitem__(self, i):
        from data.dataset import Sample, SkippedSample

        if i in self.failing:
            return SkippedSample(i, str(i), "missing_media", "video gone", None)
        return Sample(i, str(i), torch.tensor([10 + i, 11, 65]), torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 65]), [])


@pytest.mark.parametrize("failing, stand_in", [(1, [10, 11]), (0, [65])])
def test_a_record_that_fails_to_load_still_runs_one_uncounted_forward(failing, stand_in, caplog):
    """Every step runs one forward (ZeRO-3 ranks stay in step): the failed record's forward runs on the
    previous loaded sample's prompt, or on the text-only stand-in when none loaded yet; it is not scored."""
    model = _AlwaysA()
    with caplog.at_level("WARNING", logger="train.evaluation.train_eval"):
        acc, n = mcq_accuracy(model, _Dataset({failing}), _LetterTokenizer(), "cpu")
    assert len(model.calls) == 4 and model.calls[failing] == stand_in
    gold = [a for i, a in enumerate("AABA") if i != failing]  # the model answers A; the failed one is not scored
    assert (acc, n) == (pytest.approx(100 * gold.count("A") / 3), 3)
    assert "1 of 4 record(s) failed to load" in caplog.text


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
