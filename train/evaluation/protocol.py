"""What every benchmark module provides: its questions (`Question`) and its protocol (`Protocol`).

A benchmark module (mvbench, videomme, egoschema, mlvu) defines `PROTOCOL` and
`load_questions(root, options) -> list[Question]`, reading the benchmark's published layout under
`root` (spec §8). A record that cannot be read raises `BenchmarkError` naming the file and record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data.video import SamplingConfig

MAX_NEW_TOKENS = 5  # the original decoding: greedy, 5 new tokens, stop at <|im_end|>


class BenchmarkError(ValueError):
    """A benchmark file or record that cannot be read; the message names it and the reason."""


@dataclass
class Question:
    """One multiple-choice question.

    video: the media path (a file or a frame folder); start/end: seconds, or None; folder_fps: the
    frame rate of a frame folder; answer: the gold letter (None where the benchmark withholds it);
    group: questions with the same group share one decoded video (VideoMME's three per video);
    subtitles: an .srt path whose lines at the sampled frames go in front of the prompt."""

    question_id: str
    task: str
    video: str
    prompt: str
    options: list[str]
    answer: str | None
    start: float | None = None
    end: float | None = None
    folder_fps: float | None = None
    group: str = ""
    subtitles: str | None = None


@dataclass(frozen=True)
class Protocol:
    """A benchmark's evaluation protocol.

    video_fps: frames sampled per second (stride round(native / video_fps)); frame_cap: the original's
    stride cap (more than `frame_cap` sampled frames: every len // frame_cap-th kept), None: no cap;
    overrides: LongVUConfig fields set on the model for this run only (thresholds); search_letters:
    the letters the answer regex looks for; aggregate: "micro" or "task_mean" (see scoring.summarize)."""

    name: str
    video_fps: float
    frame_cap: int | None
    overrides: dict
    search_letters: str
    aggregate: str
    folder_video_fps: float | None = None  # sampling rate for frame folders, when it differs

    def sampling(self, is_folder: bool, max_frames: int | None) -> SamplingConfig:
        """The decode settings: the protocol's rate and stride cap, or `max_frames` (uniform) when given."""
        fps = self.folder_video_fps if is_folder and self.folder_video_fps else self.video_fps
        if max_frames is not None:
            return SamplingConfig(video_fps=fps, max_frames=max_frames, cap="uniform")
        return SamplingConfig(video_fps=fps, max_frames=self.frame_cap, cap="stride")

    def describe(self, compat_fallback: bool, subtitles: bool, max_frames: int | None) -> dict:
        """The protocol as recorded in results.json."""
        return {"name": "longvu-original", "benchmark": self.name, "video_fps": self.video_fps,
                "folder_video_fps": self.folder_video_fps, "frame_cap": self.frame_cap,
                "max_frames": max_frames, "thresholds": dict(self.overrides),
                "decoding": f"greedy, max_new_tokens={MAX_NEW_TOKENS}, stop at <|im_end|>",
                "search_letters": self.search_letters, "aggregate": self.aggregate,
                "compat_fallback": compat_fallback, "subtitles": subtitles}


def mcq_prompt(question: str, options: list[str], instruction: str, labelled: bool = True) -> str:
    """`Question: q\\nOptions:\\n(A) o0\\n(B) o1\\n...\\ninstruction`; with labelled=False the options are
    used as given (VideoMME's "A. ..." lines)."""
    lines = [f"({chr(ord('A') + i)}) {o}" if labelled else o for i, o in enumerate(options)]
    return "\n".join([f"Question: {question}", "Options:", *lines, instruction])


def read_json(path: Path):
    """json.load with a one-line error naming the file."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BenchmarkError(f"{path}: cannot read JSON: {err}") from err


def require(record: dict, keys: tuple[str, ...], where: str) -> None:
    """BenchmarkError naming `where` when `record` lacks one of `keys`."""
    if not isinstance(record, dict):
        raise BenchmarkError(f"{where}: expected an object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise BenchmarkError(f"{where}: missing field(s) {missing}")


def answer_letter(candidates: list[str], answer: str, where: str) -> str:
    """The letter of `answer` among `candidates` (MVBench, MLVU store the answer text)."""
    if answer not in candidates:
        raise BenchmarkError(f"{where}: answer {answer!r} is not one of the candidates {candidates}")
    return chr(ord("A") + candidates.index(answer))

