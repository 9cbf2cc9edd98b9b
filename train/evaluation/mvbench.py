"""MVBench (OpenGVLab/MVBench): 20 task JSONs under `json/`, videos under `video/<folder>/`.

Records: `video`, `question`, `candidates` (texts), `answer` (the correct text), and `start`/`end`
(seconds) for the five bounded tasks. Episodic reasoning (TVQA) is a folder of `%05d.jpg` frames at
3 fps. Protocol (original LongVU script): ~2 fps inside the bounds (stride round(fps / 2), at least
1: the original's stride is 0 for fps <= 1), frame folders every 2nd frame from index 1, drop
threshold 0.8, micro average over all questions plus per-task accuracy. An empty bound range is a
listed media error (the original crashes in np.stack).
"""

from __future__ import annotations

from pathlib import Path

from train.evaluation.protocol import (BenchmarkError, Protocol, Question, answer_letter, mcq_prompt, read_json,
                                       require)

PROTOCOL = Protocol(name="mvbench", video_fps=2.0, frame_cap=1000, overrides={"drop_threshold": 0.8},
                    search_letters="ABCDE", aggregate="micro", folder_video_fps=1.5)
INSTRUCTION = "Answer with the option's letter from the given choices directly and only give the best option."
FOLDER_FPS = 3.0  # TVQA frames_fps3_hq

# task name -> (json file, video folder under video/, frame folder?, bounded?): the published layout
TASKS = {
    "Action Sequence": ("action_sequence.json", "star/Charades_v1_480", False, True),
    "Action Prediction": ("action_prediction.json", "star/Charades_v1_480", False, True),
    "Action Antonym": ("action_antonym.json", "ssv2_video", False, False),
    "Fine-grained Action": ("fine_grained_action.json", "Moments_in_Time_Raw/videos", False, False),
    "Unexpected Action": ("unexpected_action.json", "FunQA_test/test", False, False),
    "Object Existence": ("object_existence.json", "clevrer/video_validation", False, False),
    "Object Interaction": ("object_interaction.json", "star/Charades_v1_480", False, True),
    "Object Shuffle": ("object_shuffle.json", "perception/videos", False, False),
    "Moving Direction": ("moving_direction.json", "clevrer/video_validation", False, False),
    "Action Localization": ("action_localization.json", "sta/sta_video", False, True),
    "Scene Transition": ("scene_transition.json", "scene_qa/video", False, False),
    "Action Count": ("action_count.json", "perception/videos", False, False),
    "Moving Count": ("moving_count.json", "clevrer/video_validation", False, False),
    "Moving Attribute": ("moving_attribute.json", "clevrer/video_validation", False, False),
    "State Change": ("state_change.json", "perception/videos", False, False),
    "Fine-grained Pose": ("fine_grained_pose.json", "nturgbd", False, False),
    "Character Order": ("character_order.json", "perception/videos", False, False),
    "Egocentric Navigation": ("egocentric_navigation.json", "vlnqa", False, False),
    "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq", True, True),
    "Counterfactual Inference": ("counterfactual_inference.json", "clevrer/video_validation", False, False),
}


def _question(task: str, i: int, rec: dict, root: Path, folder: str, frames: bool, bounded: bool, where: str):
    require(rec, ("video", "question", "candidates", "answer") + (("start", "end") if bounded else ()), where)
    options = [str(c) for c in rec["candidates"]]
    start, end = (float(rec["start"]), float(rec["end"])) if bounded else (None, None)
    if frames:  # every 2nd frame from index 1 (folder at 3 fps sampled at 1.5 fps, first index >= 1)
        start = max(start or 0.0, 1.0 / FOLDER_FPS)
    return Question(
        question_id=f"{task}/{i}", task=task, video=str(root / "video" / folder / rec["video"]),
        prompt=mcq_prompt(rec["question"], options, INSTRUCTION), options=options,
        answer=answer_letter(options, rec["answer"], where), start=start, end=end,
        folder_fps=FOLDER_FPS if frames else None, group=f"{task}/{i}",
    )


def load_questions(root: Path, subtitles: bool = False, subset_only: bool = False) -> list[Question]:
    """Questions of every task JSON present under `root/json/` (task order as published)."""
    json_dir = root / "json"
    if not json_dir.is_dir():
        raise BenchmarkError(f"{json_dir}: no such folder (MVBench layout: json/<task>.json, video/...)")
    known = {spec[0] for spec in TASKS.values()}
    unknown = sorted(p.name for p in json_dir.glob("*.json") if p.name not in known)
    if unknown:
        raise BenchmarkError(f"{json_dir}: unknown task file(s) {unknown}; MVBench's are {sorted(known)}")
    out = []
    for task, (name, folder, frames, bounded) in TASKS.items():
        path = json_dir / name
        if not path.is_file():
            continue
        records = read_json(path)
        if not isinstance(records, list):
            raise BenchmarkError(f"{path}: expected a list of records")
        out += [_question(task, i, r, root, folder, frames, bounded, f"{path} record {i}") for i, r in enumerate(records)]
    if not out:
        raise BenchmarkError(f"{json_dir}: no MVBench task file found")
    return out
