"""MLVU dev: `json/{1_plotQA,2_needle,3_ego,4_count,5_order,6_anomaly_reco,7_topic_reasoning}.json`
(records: video, question, candidates, answer as text), videos `video/<task folder>/<video>`.

Protocol (original LongVU script): 0.5 fps, stride cap of 1000 frames, DINO threshold 0.82, drop
threshold 0.77, options (A).., letters A-D; the score is M-avg, the mean of the per-task accuracies.
Paths are joined once (the original joins the data path twice and scores black frames).
"""

from __future__ import annotations

from pathlib import Path

from train.evaluation.protocol import (BenchmarkError, Protocol, Question, answer_letter, mcq_prompt, read_json,
                                       require)

PROTOCOL = Protocol(name="mlvu", video_fps=0.5, frame_cap=1000,
                    overrides={"dino_threshold": 0.82, "drop_threshold": 0.77}, search_letters="ABCD",
                    aggregate="task_mean")
INSTRUCTION = "Respond with only the letter (A, B, C or D) of the correct option."
TASKS = ("1_plotQA", "2_needle", "3_ego", "4_count", "5_order", "6_anomaly_reco", "7_topic_reasoning")


def load_questions(root: Path, subtitles: bool = False, subset_only: bool = False) -> list[Question]:
    json_dir = root / "json"
    if not json_dir.is_dir():
        raise BenchmarkError(f"{json_dir}: no such folder (MLVU layout: json/<task>.json, video/<task>/...)")
    out = []
    for task in TASKS:
        path = json_dir / f"{task}.json"
        if not path.is_file():
            continue
        records = read_json(path)
        if not isinstance(records, list):
            raise BenchmarkError(f"{path}: expected a list of records")
        name = task.split("_", 1)[1]
        for i, rec in enumerate(records):
            where = f"{path} record {i}"
            require(rec, ("video", "question", "candidates", "answer"), where)
            options = [str(c) for c in rec["candidates"]]
            out.append(Question(
                question_id=f"{name}/{i}", task=name, video=str(root / "video" / task / rec["video"]),
                prompt=mcq_prompt(rec["question"], options, INSTRUCTION).rstrip(), options=options,
                answer=answer_letter(options, str(rec["answer"]), where), group=f"{name}/{rec['video']}",
            ))
    if not out:
        raise BenchmarkError(f"{json_dir}: none of MLVU's task files {list(TASKS)}")
    return out
