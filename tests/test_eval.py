"""`longvu eval`: answer parsing on hand-derived strings (the original's failure cases included), the
four benchmark layouts written at test time, end-to-end runs on a tiny exported model, 2 processes ==
1 process, resume after a kill, and `eval score` == the live scores.

The tiny model's LM head is restricted to a handful of tokens (letters, "Based", parentheses,
<|im_end|>), so its greedy answers exercise every parsing branch; the expected pred/correct of each
row are derived here from its raw output and the gold letter by hand-written rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.video import sample_indices
from train.evaluation import egoschema, mlvu, mvbench, videomme
from train.evaluation.scoring import parse_answer, summarize

sys.path.insert(0, str(Path(__file__).parent))
from eval_layouts import write_egoschema, write_mlvu, write_mvbench, write_videomme  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ANSWER_TOKENS = ["A", "B", "C", "D", "E", " A", " B", " C", "(", ")", "Based", " the", "<|im_end|>"]


# --- parsing and scoring on hand-derived strings ------------------------------------------------------

@pytest.mark.parametrize("output, n, letters, compat, expected", [
    ("B", 4, "ABCD", False, ("B", "ok")),
    ("(C)<|im_end|>", 5, "ABCDE", False, ("C", "ok")),
    (" (D) the ball", 4, "ABCD", False, ("D", "ok")),
    ("Answer: A", 4, "ABCD", False, ("A", "ok")),           # "Answer" deleted; its A is not the answer
    ("Based on the video, E.", 5, "ABCDE", False, ("E", "ok")),  # the original regex reads "B" in "Based"
    ("Because", 5, "ABCDE", False, (None, "unparsed")),      # a capital inside a word is no letter
    ("", 4, "ABCD", False, (None, "unparsed")),               # the original: IndexError
    ("I do not know", 4, "ABCD", False, (None, "unparsed")),
    ("E", 4, "ABCDE", False, ("E", "out_of_range")),          # 4 options: E is invalid, scored wrong
    ("E", 4, "ABCDE", True, ("C", "fallback")),               # --compat-fallback: the original's "C"
    ("D", 3, "ABCDE", False, ("D", "out_of_range")),
    ("F", 6, "ABCD", False, ("F", "ok")),                     # a 6-option question's own letters are searched
    ("E", 4, "ABCD", False, (None, "unparsed")),              # E is not among MLVU's A-D
    ("the answer is (B)", 2, "ABCDE", False, ("B", "ok")),
])
def test_parse_answer_hand_derived(output, n, letters, compat, expected):
    parsed = parse_answer(output, n, letters, compat)
    assert (parsed.pred, parsed.status) == expected


def _row(qid, task, correct, status="ok"):
    return {"question_id": qid, "task": task, "correct": correct, "status": status}


def test_summarize_micro_and_task_mean():
    rows = [_row("1", "a", True), _row("2", "a", False), _row("3", "a", True), _row("4", "a", False),
            _row("5", "b", True), _row("6", "b", False, "unparsed"), _row("7", "b", None),
            _row("8", "b", False, "missing_media")]
    micro = summarize(rows, "x", {}, "micro")
    assert micro["n"] == 7 and micro["n_unscored"] == 1
    assert micro["overall"] == pytest.approx(100 * 3 / 7)
    assert micro["per_task"] == {"a": 50.0, "b": pytest.approx(100 / 3)}
    assert micro["unparsed"] == 1 and micro["missing_media"] == 1 and micro["unparsed_ids"] == ["6"]
    assert summarize(rows, "x", {}, "task_mean")["overall"] == pytest.approx((50 + 100 / 3) / 2)


def test_stride_cap_is_the_original_rule():
    # 1-hour 30-fps video at 0.5 fps: 1800 sampled; > 1000 -> every 1800 // 1000 = 1st: all 1800 stay
    assert len(sample_indices(108000, 30, 0.5, max_frames=1000, cap="stride")) == 1800
    idx = sample_indices(30 * 2500 * 2, 30, 0.5, max_frames=1000, cap="stride")  # 2500 sampled -> every 2nd
    assert len(idx) == 1250 and idx[1] - idx[0] == 120
    assert len(sample_indices(30 * 2500 * 2, 30, 0.5, max_frames=1000)) == 1000  # the uniform default


# --- layouts ------------------------------------------------------------------------------------------

def test_layout_readers_prompts_and_answers(tmp_path):
    mv = mvbench.load_questions(write_mvbench(tmp_path / "mv"))
    assert [q.task for q in mv] == ["Action Sequence"] * 2 + ["Action Antonym"] * 2 + ["Episodic Reasoning"]
    assert mv[0].prompt == ("Question: What did the person do first?\nOptions:\n(A) sat\n(B) ran\n(C) ate\n"
                            "Answer with the option's letter from the given choices directly and only give the best option.")
    assert (mv[0].answer, mv[0].start, mv[0].end) == ("B", 1.0, 3.0)
    assert mv[4].answer == "D" and mv[4].folder_fps == 3.0 and mv[4].video.endswith("tvqa/frames_fps3_hq/clip1")
    vm = videomme.load_questions(write_videomme(tmp_path / "vm"), subtitles=True)
    assert [q.group for q in vm] == ["vid1"] * 3 + ["vid2"] and vm[3].task == "long" and vm[1].answer == "B"
    assert vm[0].subtitles.endswith("vid1.srt") and vm[3].subtitles is None
    assert vm[0].prompt == ("Question: How many?\nOptions:\nA. red\nB. green\nC. blue\nD. black\n"
                            "Respond with only the letter (A, B, C, or D) of the correct option.\n")
    ego = egoschema.load_questions(write_egoschema(tmp_path / "ego"))
    assert [(q.question_id, q.task, q.answer) for q in ego] == [("q1", "subset", "A"), ("q2", "subset", "E"),
                                                                  ("q3", "full", None), ("q4", "subset", "B")]
    assert ego[0].prompt.endswith("(E) choice 4\nRespond with only the letter (A, B, C, D or E) of the correct option.")
    assert [q.question_id for q in egoschema.load_questions(tmp_path / "ego", subset_only=True)] == ["q1", "q2", "q4"]
    ml = mlvu.load_questions(write_mlvu(tmp_path / "ml"))
    assert [(q.task, q.answer) for q in ml] == [("plotQA", "C"), ("plotQA", "A"), ("count", "C")]
    assert ml[0].group == ml[1].group and ml[0].video.endswith("video/1_plotQA/p.mp4")


def test_layout_errors_name_file_and_record(tmp_path):
    from train.evaluation.protocol import BenchmarkError

    root = write_mlvu(tmp_path / "ml")
    (root / "json/4_count.json").write_text(json.dumps([{"video": "c.mp4", "question": "?", "candidates": ["1"]}]))
    with pytest.raises(BenchmarkError, match=r"4_count.json record 0: missing field\(s\) \['answer'\]"):
        mlvu.load_questions(root)
    (root / "json/4_count.json").write_text(json.dumps([{"video": "c.mp4", "question": "?", "candidates": ["1"],
                                                          "answer": "9"}]))
    with pytest.raises(BenchmarkError, match="4_count.json record 0: answer '9' is not one of"):
        mlvu.load_questions(root)


@pytest.mark.parametrize("index", [7, -1, 5, "x", None])
def test_egoschema_answer_index_out_of_range_names_file_and_question(tmp_path, index):
    from train.evaluation.protocol import BenchmarkError

    root = write_egoschema(tmp_path / "ego")
    (root / "subset_answers.json").write_text(json.dumps({"q1": 0, "q2": index}))
    with pytest.raises(BenchmarkError, match=r"subset_answers.json: q_uid q2: answer .* is not an option index 0..4"):
        egoschema.load_questions(root)


def test_subtitles_at_sampled_frames(qwen_tokenizer, tmp_path):
    cues = videomme.read_srt(str(write_videomme(tmp_path / "vm") / "subtitle/vid1.srt"))
    assert cues[1] == (2.5, 5.0, "Hello there.")
    assert videomme.subtitle_lines(cues, [0.0, 2.0, 4.0, 6.0]) == ["Hello there."]  # noise and repeat removed
    lines = [f"line {i} " + "word " * 50 for i in range(30)]  # ~1600 tokens
    kept = videomme.fit_tokens(lines, qwen_tokenizer, budget=600)
    assert kept == lines[::3]  # 30 lines < 200: the original's interval would be 0


# --- shards, merge and rescoring (no model) --------------------------------------------------------------

def _questions(n: int) -> list:
    from train.evaluation.protocol import Question

    return [Question(f"q{i}", "count", f"v{i}.mp4", f"Q{i}?", ["1", "2", "3", "4"], "B", group=f"q{i}")
            for i in range(n)]


def _answered(q, output="(B)") -> dict:
    from train.evaluation.answer import question_row

    return question_row(q, q.prompt, output, {"frames_decoded": 3, "frames_kept": 3, "visual_tokens": 9}, 0.5)


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_append_after_a_partial_line_keeps_every_question(tmp_path, monkeypatch):
    """A kill mid-write leaves q1's row cut; the rerun's rows start on a new line, so q1 is not lost."""
    from train.evaluation import answer
    from train.evaluation.runner import EvalOptions, merge, write_results

    qs = _questions(3)
    shard = tmp_path / "shards" / "rank0.jsonl"
    _write_rows(shard, [_answered(qs[0])])
    with open(shard, "a") as f:
        f.write(json.dumps(_answered(qs[1]))[:40])  # the kill: no closing brace, no newline
    monkeypatch.setattr(answer, "load_eval_model", lambda *a: (None, None))
    monkeypatch.setattr(answer, "answer_group", lambda ctx, group: [_answered(q) for q in group])
    opts = EvalOptions(model=tmp_path, task="mlvu", data_root=tmp_path, output=tmp_path)
    assert answer.answer_rank(opts, qs, 0, 1) == 2  # q1 (cut) and q2
    lines = shard.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[2])["question_id"] == "q1"
    rows = merge(tmp_path, qs)
    assert [r["question_id"] for r in rows] == ["q0", "q1", "q2"]
    results = write_results(tmp_path, "mlvu", rows, mlvu.PROTOCOL.describe(False, False, None))
    assert (results["n"], results["overall"], results["no_row"]) == (3, 100.0, 0)


def test_merge_lists_questions_without_a_row(tmp_path, caplog):
    """A question with no row at all is a `no_row` placeholder: warned, counted, scored wrong, retried."""
    from train.evaluation.runner import done_ids, merge, rescore, write_results

    qs = _questions(8)
    _write_rows(tmp_path / "shards" / "rank0.jsonl", [_answered(qs[0]), _answered(qs[7])])
    with caplog.at_level("WARNING", logger="train.evaluation.runner"):
        rows = merge(tmp_path, qs)
    assert "6 question(s) have no row" in caplog.text and "q1, q2, q3, q4, q5, ..." in caplog.text
    assert "q6" not in caplog.text
    assert [r["question_id"] for r in rows] == [f"q{i}" for i in range(8)]
    results = write_results(tmp_path, "mlvu", rows, mlvu.PROTOCOL.describe(False, False, None))
    assert (results["n"], results["overall"], results["no_row"]) == (8, 25.0, 6)
    assert results["no_row_ids"] == [f"q{i}" for i in range(1, 7)] and results["missing_media"] == 0
    assert done_ids(tmp_path) == {"q0", "q7"}  # the placeholders are answered on resume
    assert rescore(tmp_path, "mlvu")["no_row"] == 6
    failed = {**_answered(qs[1], output=None), "error": "v1.mp4 does not exist"}  # the retry's media fails
    _write_rows(tmp_path / "shards" / "rank0.jsonl", [failed])
    write_results(tmp_path, "mlvu", merge(tmp_path, qs), {"compat_fallback": False})
    rows = _rows(tmp_path)
    assert [r["status"] for r in rows[:3]] == ["ok", "missing_media", "no_row"] and rows[1]["error"] == failed["error"]


def test_rescore_counts_a_retried_question_once(tmp_path):
    """predictions.jsonl has q1 without media; the retry's shard row answers it: q1 is scored once, ok."""
    from train.evaluation.runner import rescore

    qs = _questions(2)
    _write_rows(tmp_path / "predictions.jsonl", [_answered(qs[0]), {**_answered(qs[1], None), "error": "gone"}])
    _write_rows(tmp_path / "shards" / "rank0.jsonl", [_answered(qs[1], "(A)")])
    results = rescore(tmp_path, "mlvu")
    assert (results["n"], results["overall"], results["missing_media"]) == (2, 50.0, 0)
    assert [r["question_id"] for r in _rows(tmp_path)] == ["q0", "q1"]


# --- end to end on a tiny exported model --------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen_tokenizer):
    """A tiny exported model whose LM head only scores ANSWER_TOKENS (others get logit 0)."""
    from longvu.tiny import tiny_model
    from train.export import export

    root = tmp_path_factory.mktemp("evalmodel")
    model = tiny_model("video", seed=3)
    ids = [qwen_tokenizer.convert_tokens_to_ids(t) if t.startswith("<|") else
           qwen_tokenizer.encode(t, add_special_tokens=False)[0] for t in ANSWER_TOKENS]
    with torch.no_grad():
        head = model.lm_head.weight
        rows = torch.randn(len(ids), head.shape[1], generator=torch.Generator().manual_seed(1)) * 3
        head.zero_()
        head[ids] = rows
    model.save_pretrained(root / "src", include_towers=True)
    qwen_tokenizer.save_pretrained(root / "src")
    export(root / "src", root / "export", dtype="fp32", include_towers=True)
    return root / "export"


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    return {"mvbench": write_mvbench(root / "mvbench"), "videomme": write_videomme(root / "videomme"),
            "egoschema": write_egoschema(root / "egoschema"), "mlvu": write_mlvu(root / "mlvu")}


def _eval(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "train", "eval", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _expected(output: str | None, n: int, letters: str, gold: str | None) -> tuple:
    """Hand rules: first standalone letter of `letters` (after dropping <|im_end|> and "Answer");
    valid if within the n options; correct if equal to gold."""
    if output is None:
        return None, False if gold else None
    import re

    text = output.replace("<|im_end|>", "").replace("Answer", "")
    words = re.findall(r"[A-Za-z]+", text)
    pred = next((w for w in words if len(w) == 1 and w in letters), None)
    valid = pred is not None and ord(pred) - ord("A") < n
    return pred, (None if gold is None else bool(valid and pred == gold))


FIELDS = {"question_id", "task", "prompt", "output", "pred", "answer", "correct", "frames_decoded", "frames_kept",
          "visual_tokens", "seconds"}
FRAMES = {  # frames decoded per question, worked out from the layouts and each protocol's sampling
    # 10-fps clips at 2 fps (stride 5): bounds [1, 3) -> 10..25, [0, 4) -> 0..35, 3 s unbounded -> 6; missing;
    # 12 frames at 3 fps, bounds [0.5, 4): from round(1.5) = 2 to 12, every 2nd: 2, 4, .., 10
    "mvbench": [4, 8, 6, 0, 5],
    "videomme": [3, 3, 3, 2], "egoschema": [3, 3, 3, 0], "mlvu": [3, 3, 2],
}


@pytest.mark.parametrize("task", ["mvbench", "videomme", "egoschema", "mlvu"])
def test_eval_end_to_end_each_layout(task, model_dir, benchmarks, tmp_path):
    extra = ["--subtitles"] if task == "videomme" else []
    proc = _eval("--model", model_dir, "--task", task, "--data-root", benchmarks[task], "--output", tmp_path, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, results = _rows(tmp_path), json.loads((tmp_path / "results.json").read_text())
    assert all(FIELDS <= set(r) for r in rows)
    assert [r["frames_decoded"] for r in rows] == FRAMES[task]
    letters = {"mvbench": "ABCDE", "videomme": "ABCD", "egoschema": "ABCDE", "mlvu": "ABCD"}[task]
    for r in rows:
        assert (r["pred"], r["correct"]) == _expected(r["output"], r["n_options"], letters, r["answer"]), r
    assert {r["status"] for r in rows} - {"missing_media"} >= {"ok"}  # the biased head answers letters
    scored = [r for r in rows if r["correct"] is not None]
    assert results["n"] == len(scored)
    for key in ("task", "protocol", "overall", "per_task", "unparsed", "fallback", "missing_media"):
        assert key in results
    if task != "mlvu":
        assert results["overall"] == pytest.approx(100 * sum(r["correct"] for r in scored) / len(scored))
    missing = [r for r in rows if r["output"] is None]
    assert results["missing_media"] == len(missing) == (1 if task in ("mvbench", "egoschema") else 0)
    assert all(r["frames_decoded"] == 0 and "does not exist" in r["error"] for r in missing)  # no black frame
    assert [e["question_id"] for e in results["errors"]] == [r["question_id"] for r in missing]
    if task == "videomme":
        assert rows[0]["prompt"].startswith("This video's subtitles are listed below:\nHello there.\nQuestion:")
        assert results["protocol"]["thresholds"] == {"drop_threshold": 0.65}
    if task == "egoschema":
        csv = (tmp_path / "submission.csv").read_text().splitlines()
        assert csv[0] == "q_uid,answer" and [line.split(",")[0] for line in csv[1:]] == ["q1", "q2", "q3", "q4"]
    # rescoring from predictions.jsonl alone gives the same rows and results
    before = (tmp_path / "results.json").read_text(), (tmp_path / "predictions.jsonl").read_text()
    score = _eval("score", tmp_path, "--task", task)
    assert score.returncode == 0, score.stderr[-2000:]
    assert ((tmp_path / "results.json").read_text(), (tmp_path / "predictions.jsonl").read_text()) == before



def test_compat_fallback_rescore(model_dir, benchmarks, tmp_path):
    """`eval score --compat-fallback` turns exactly the out-of-range letters into "C"."""
    proc = _eval("--model", model_dir, "--task", "mvbench", "--data-root", benchmarks["mvbench"], "--output", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = _rows(tmp_path)
    assert _eval("score", tmp_path, "--task", "mvbench", "--compat-fallback").returncode == 0
    compat, results = _rows(tmp_path), json.loads((tmp_path / "results.json").read_text())
    for a, b in zip(plain, compat):
        if a["status"] == "out_of_range":
            assert (b["status"], b["pred"], b["correct"]) == ("fallback", "C", b["answer"] == "C")
        else:
            assert (a["pred"], a["correct"]) == (b["pred"], b["correct"])
    assert results["fallback"] == sum(a["status"] == "out_of_range" for a in plain)
    assert results["protocol"]["compat_fallback"] is True


def _answers(rows):
    return [(r["question_id"], r["output"], r["pred"], r["frames_kept"], r["visual_tokens"]) for r in rows]


@pytest.mark.slow
def test_two_processes_equal_one(model_dir, benchmarks, tmp_path):
    args = ["--model", model_dir, "--task", "videomme", "--data-root", benchmarks["videomme"]]
    one = _eval(*args, "--output", tmp_path / "one")
    two = _eval(*args, "--output", tmp_path / "two", "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    rows1, rows2 = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["question_id"] for r in rows2] == ["001-1", "001-2", "001-3", "002-1"]  # each once, in order
    assert _answers(rows1) == _answers(rows2)
    assert not list((tmp_path / "two" / "shards").glob("*.jsonl"))  # merged


@pytest.mark.slow
def test_resume_after_kill(model_dir, tmp_path):
    """SIGKILL once rows are on disk; the rerun answers only the rest; every question once."""
    from data.synthetic import write_scene_video

    root = write_mlvu(tmp_path / "ml")
    recs = [{"video": f"v{i}.mp4", "question": f"Q{i}?", "candidates": ["1", "2", "3", "4"], "answer": "2"}
            for i in range(12)]
    for i in range(12):
        write_scene_video(root / f"video/4_count/v{i}.mp4", seconds=4, fps=10, height=48, width=64, n_scenes=2, seed=i)
    (root / "json/4_count.json").write_text(json.dumps(recs))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "train", "eval", "--model", str(model_dir), "--task", "mlvu", "--data-root",
            str(root), "--output", str(out)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = out / "shards" / "rank0.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not shard.is_file() or len(shard.read_text().splitlines()) < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in shard.read_text().splitlines() if line.endswith("}")]
    assert 3 <= len(before) < 15, "the run finished before the kill; make it longer"
    rerun = _eval("--model", model_dir, "--task", "mlvu", "--data-root", root, "--output", out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = _rows(out)
    assert sorted(r["question_id"] for r in rows) == sorted(
        [f"plotQA/{i}" for i in range(2)] + [f"count/{i}" for i in range(12)])
    by_id = {r["question_id"]: r for r in rows}
    for r in before:  # answered before the kill: kept as written, not answered again
        assert by_id[r["question_id"]]["seconds"] == r["seconds"]


def test_videomme_questions_share_one_encode(model_dir, benchmarks, tmp_path):
    """answer_group: the three questions of a video decode it once and run the towers once."""
    from train.evaluation.answer import answer_group, load_eval_model
    from train.evaluation.runner import EvalOptions

    opts = EvalOptions(model=model_dir, task="videomme", data_root=benchmarks["videomme"], output=tmp_path)
    model, tok = load_eval_model(opts, videomme.PROTOCOL, 0)
    assert model.config.drop_threshold == 0.65  # the protocol's threshold, on this loaded model only
    calls = []
    model.model.towers[0].register_forward_hook(lambda *_: calls.append(1))
    questions = videomme.load_questions(benchmarks["videomme"])[:3]
    ctx = dict(model=model, tokenizer=tok, protocol=videomme.PROTOCOL, max_frames=None)
    rows = answer_group(ctx, questions)
    assert len(rows) == 3 and len(calls) == 1
    assert json.loads((model_dir / "config.json").read_text()).get("drop_threshold") != 0.65
