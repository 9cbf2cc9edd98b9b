"""EgoSchema: a question JSON list (`questions.json`: q_uid, question, option 0..4), videos
`good_clips_git/<q_uid>.{mp4,avi,mov,mkv}`, and `subset_answers.json` ({q_uid: answer index}) for
the 500-question subset whose answers are public.

Protocol (original LongVU script): 0.5 fps, stride cap of 1000 frames, drop threshold 0.8, options
(A)..(E). Every question is answered (the full set goes to `submission.csv`, q_uid,answer as an
index); accuracy is over the subset. `--subset-only` answers the subset alone.
"""

from __future__ import annotations

from pathlib import Path

from train.evaluation.protocol import BenchmarkError, Protocol, Question, mcq_prompt, read_json, require

PROTOCOL = Protocol(name="egoschema", video_fps=0.5, frame_cap=1000, overrides={"drop_threshold": 0.8},
                    search_letters="ABCDE", aggregate="micro")
INSTRUCTION = "Respond with only the letter (A, B, C, D or E) of the correct option."
QUESTION_FILES = ("questions.json",)
EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
N_OPTIONS = 5  # option 0..4


def _question_file(root: Path) -> Path:
    for name in QUESTION_FILES:
        if (root / name).is_file():
            return root / name
    raise BenchmarkError(f"{root}: no questions.json (EgoSchema layout: questions.json, good_clips_git/, "
                         "subset_answers.json)")


def _video(root: Path, q_uid: str) -> str:
    for ext in EXTENSIONS:
        if (root / "good_clips_git" / f"{q_uid}{ext}").is_file():
            return str(root / "good_clips_git" / f"{q_uid}{ext}")
    return str(root / "good_clips_git" / f"{q_uid}.mp4")  # missing: reported when it fails to decode


def _answers(root: Path) -> dict[str, str]:
    path = root / "subset_answers.json"
    if not path.is_file():
        return {}
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise BenchmarkError(f"{path}: expected an object {{q_uid: answer index}}")
    out = {}
    for q_uid, index in raw.items():
        try:
            k = int(index)
        except (TypeError, ValueError):
            k = -1
        if not 0 <= k < N_OPTIONS:
            raise BenchmarkError(f"{path}: q_uid {q_uid}: answer {index!r} is not an option index 0..{N_OPTIONS - 1}")
        out[str(q_uid)] = chr(ord("A") + k)
    return out


def load_questions(root: Path, subtitles: bool = False, subset_only: bool = False) -> list[Question]:
    path = _question_file(root)
    records, answers = read_json(path), _answers(root)
    if not isinstance(records, list):
        raise BenchmarkError(f"{path}: expected a list of questions")
    out = []
    for i, rec in enumerate(records):
        keys = ("q_uid", "question") + tuple(f"option {k}" for k in range(N_OPTIONS))
        require(rec, keys, f"{path} record {i}")
        q_uid = str(rec["q_uid"])
        if subset_only and q_uid not in answers:
            continue
        options = [str(rec[f"option {k}"]) for k in range(N_OPTIONS)]
        out.append(Question(question_id=q_uid, task="subset" if q_uid in answers else "full",
                            video=_video(root, q_uid), prompt=mcq_prompt(rec["question"], options, INSTRUCTION),
                            options=options, answer=answers.get(q_uid), group=q_uid))
    return out


def write_submission(rows: list[dict], path: Path) -> None:
    """submission.csv: `q_uid,answer` (the option index) for every answered question."""
    lines = ["q_uid,answer"]
    for row in rows:
        pred = row.get("pred")
        index = ord(pred) - ord("A") if pred and "A" <= pred <= "E" else -1
        lines.append(f"{row['question_id']},{index}")
    path.write_text("\n".join(lines) + "\n")
