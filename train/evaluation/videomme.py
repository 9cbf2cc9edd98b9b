"""Video-MME (lmms-lab/Video-MME): `videomme/test-00000-of-00001.parquet` (or that file at the root),
videos `data/<videoID>.mp4`, subtitles `subtitle/<videoID>.srt`.

Columns read: videoID, duration (short/medium/long), question_id, question, options
(["A. ...", ...]), answer (a letter). Protocol (original LongVU script): 0.5 fps with no frame cap,
drop threshold 0.65, options as given, overall accuracy plus short/medium/long. With subtitles the
prompt starts with the subtitle lines shown at the sampled frames ([Music]/[Applause] and repeats
removed), cut to at most 6000 tokens by keeping every k-th line (the original crashes when it has
to subsample fewer than 200 lines). The three questions of a video share one decode.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from train.evaluation.protocol import BenchmarkError, Protocol, Question, mcq_prompt

PROTOCOL = Protocol(name="videomme", video_fps=0.5, frame_cap=None, overrides={"drop_threshold": 0.65},
                    search_letters="ABCD", aggregate="micro")
INSTRUCTION = "Respond with only the letter (A, B, C, or D) of the correct option.\n"
SUBTITLE_HEADER = "This video's subtitles are listed below:\n"
MAX_SUBTITLE_TOKENS = 6000
PARQUET_NAMES = ("videomme/test-00000-of-00001.parquet", "test-00000-of-00001.parquet")
COLUMNS = ("videoID", "duration", "question_id", "question", "options", "answer")
_TIME = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)\s*-->\s*(\d+):(\d+):(\d+)[,.](\d+)")
_NOISE = ("[Music]", "[Applause]")


def _parquet(root: Path) -> Path:
    for name in PARQUET_NAMES:
        if (root / name).is_file():
            return root / name
    raise BenchmarkError(f"{root}: no {' or '.join(PARQUET_NAMES)} (Video-MME layout)")


def load_questions(root: Path, subtitles: bool = False, subset_only: bool = False) -> list[Question]:
    """One Question per parquet row, grouped by video."""
    import pyarrow.parquet as pq

    path = _parquet(root)
    table = pq.read_table(path).to_pylist()
    out = []
    for i, row in enumerate(table):
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise BenchmarkError(f"{path} row {i}: missing column(s) {missing}")
        vid, options = str(row["videoID"]), [str(o) for o in row["options"]]
        srt = root / "subtitle" / f"{vid}.srt"
        out.append(Question(
            question_id=str(row["question_id"]), task=str(row["duration"]), video=str(root / "data" / f"{vid}.mp4"),
            prompt=mcq_prompt(row["question"], options, INSTRUCTION, labelled=False), options=options,
            answer=str(row["answer"]).strip(), group=vid, subtitles=str(srt) if subtitles and srt.is_file() else None,
        ))
    return out


def _seconds(h, m, s, ms) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 10 ** len(ms)


def read_srt(path: str) -> list[tuple[float, float, str]]:
    """(start s, end s, text) per cue of an .srt file; text lines joined by a space."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig", errors="replace")
    except OSError as err:
        raise BenchmarkError(f"{path}: cannot read subtitles: {err}") from err
    cues = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [ln.strip() for ln in block.strip().split("\n")]
        for k, line in enumerate(lines):
            hit = _TIME.search(line)
            if hit:
                g = hit.groups()
                cues.append((_seconds(*g[:4]), _seconds(*g[4:]), " ".join(lines[k + 1:]).strip()))
                break
    return cues


def subtitle_lines(cues: list[tuple[float, float, str]], frame_times: list[float]) -> list[str]:
    """The cue text shown at each sampled frame time, noise removed, each distinct line once, in order."""
    out, seen = [], set()
    for t in frame_times:
        for start, end, text in cues:
            if start <= t < end:
                for noise in _NOISE:
                    text = text.replace(noise, "")
                text = text.strip()
                if text and text not in seen:
                    seen.add(text)
                    out.append(text)
                break
    return out


def fit_tokens(lines: list[str], tokenizer, budget: int = MAX_SUBTITLE_TOKENS) -> list[str]:
    """Keep every k-th line, with the smallest k >= 1 for which the joined text fits `budget` tokens."""
    n_tokens = len(tokenizer("\n".join(lines), add_special_tokens=False)["input_ids"]) if lines else 0
    k = 1 if n_tokens <= budget else math.ceil(n_tokens / budget)
    kept = lines[::k]
    while kept and len(tokenizer("\n".join(kept), add_special_tokens=False)["input_ids"]) > budget:
        k += 1
        kept = lines[::k]
    return kept


def subtitle_prompt(question: Question, frame_times: list[float], tokenizer) -> str:
    """The question's prompt preceded by its subtitles at `frame_times` (seconds)."""
    lines = fit_tokens(subtitle_lines(read_srt(question.subtitles), frame_times), tokenizer)
    return SUBTITLE_HEADER + "\n".join(lines) + "\n" + question.prompt
