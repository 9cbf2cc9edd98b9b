"""`longvu eval`: answer a benchmark's questions with a model directory, resumably, over N ranks.

Files under OUT:
- `shards/rank<r>.jsonl`: rank r's rows, appended and flushed one question at a time (a kill loses
  only the questions in flight);
- `predictions.jsonl`: all rows in benchmark order, merged from the shards when the ranks finish;
- `results.json`, `submission.csv` (EgoSchema): written by `scoring` from predictions.jsonl.

Resume: the question ids already in predictions.jsonl or a shard are skipped (rows whose media
failed are retried). Sharding is by video group (`Question.group`), group k to rank k % N, so every
question belongs to exactly one rank and a video's questions share one decode and one MediaCache.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from train.evaluation import egoschema, mlvu, mvbench, videomme
from longvu.durable import write_text_durably
from train.evaluation.protocol import Question
from train.evaluation.scoring import score_row, summarize, summary_table

logger = logging.getLogger(__name__)


class RankFailed(RuntimeError):
    """A rank of `--nproc N` exited with an error (its rows so far are kept: rerun to resume)."""


BENCHMARKS = {"mvbench": mvbench, "videomme": videomme, "egoschema": egoschema, "mlvu": mlvu}
SHARDS = "shards"


@dataclass
class EvalOptions:
    model: Path
    task: str
    data_root: Path
    output: Path
    nproc: int = 1
    limit: int | None = None
    subtitles: bool = False
    compat_fallback: bool = False
    subset_only: bool = False
    max_frames: int | None = None
    device: str | None = None
    dtype: str | None = None
    siglip_path: str | None = None
    dino_path: str | None = None


def load_benchmark(opts: EvalOptions) -> list[Question]:
    """The benchmark's questions under data_root, the first `limit` of them when given."""
    questions = BENCHMARKS[opts.task].load_questions(opts.data_root, opts.subtitles, opts.subset_only)
    return questions[: opts.limit] if opts.limit else questions


def shard(questions: list[Question], rank: int, world: int) -> list[Question]:
    """Rank `rank`'s questions: those of the video groups k with k % world == rank (first-seen order)."""
    order = {g: k for k, g in enumerate(dict.fromkeys(q.group for q in questions))}
    return [q for q in questions if order[q.group] % world == rank]


def read_rows(out: Path) -> list[dict]:
    """Rows of predictions.jsonl, then of every shard (a later row for the same id wins in `merge`).
    A truncated last line (a kill mid-write) is ignored."""
    files = [out / "predictions.jsonl"] + sorted((out / SHARDS).glob("rank*.jsonl"))
    rows = []
    for path in files:
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_text().splitlines()):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s line %d: incomplete row ignored (interrupted write)", path, n + 1)
    return rows


def done_ids(out: Path) -> set[str]:
    """Question ids answered already (rows with an output; failed media are retried)."""
    return {r["question_id"] for r in read_rows(out) if r.get("output") is not None}


def _no_row(q: Question) -> dict:
    from train.evaluation.answer import question_row

    empty = {"frames_decoded": 0, "frames_kept": 0, "visual_tokens": 0}
    return {**question_row(q, q.prompt, None, empty, 0.0, error="no row written (interrupted run); rerun to answer"),
            "no_row": True}


def latest_rows(rows: list[dict]) -> dict[str, dict]:
    """{question_id: its row}: the last row with an output, else the last row (read_rows' order)."""
    latest: dict[str, dict] = {}
    for row in rows:
        prev = latest.get(row["question_id"])
        if prev is None or row.get("output") is not None or prev.get("output") is None:
            latest[row["question_id"]] = row
    return latest


def merge(out: Path, questions: list[Question]) -> list[dict]:
    """Write predictions.jsonl: one row per question, benchmark order; remove the merged shards.
    A question with no row at all gets a `no_row` placeholder (scored wrong, retried on resume)."""
    latest = latest_rows(read_rows(out))
    absent = [q for q in questions if q.question_id not in latest]
    if absent:
        logger.warning("%s: %d question(s) have no row, scored as no_row (rerun to answer them): %s%s", out,
                       len(absent), ", ".join(q.question_id for q in absent[:5]), ", ..." if len(absent) > 5 else "")
        latest.update((q.question_id, _no_row(q)) for q in absent)
    order = {q.question_id: k for k, q in enumerate(questions)}
    rows = sorted(latest.values(), key=lambda r: order.get(r["question_id"], len(order)))
    write_text_durably(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for path in (out / SHARDS).glob("rank*.jsonl"):
        path.unlink()
    return rows


def write_results(out: Path, task: str, rows: list[dict], protocol: dict) -> dict:
    """Score `rows` (from their output and answer), rewrite predictions.jsonl and results.json."""
    bench = BENCHMARKS[task]
    scored = [score_row(r, bench.PROTOCOL.search_letters, protocol["compat_fallback"]) for r in rows]
    (out / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored))
    results = summarize(scored, task, protocol, bench.PROTOCOL.aggregate)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    if task == "egoschema":
        egoschema.write_submission(scored, out / "submission.csv")
    return results


def rescore(out: Path, task: str, compat_fallback: bool | None = None) -> dict:
    """`longvu eval score`: recompute pred/correct/results from predictions.jsonl alone (no model).
    compat_fallback None: as recorded in the previous results.json (default False). Rows of unmerged
    shards count as in `merge`: one per question."""
    rows = list(latest_rows(read_rows(out)).values())
    if not rows:
        raise FileNotFoundError(f"{out}: no predictions.jsonl rows to score")
    previous = out / "results.json"
    protocol = json.loads(previous.read_text())["protocol"] if previous.is_file() else \
        BENCHMARKS[task].PROTOCOL.describe(False, False, None)
    if compat_fallback is not None:
        protocol["compat_fallback"] = compat_fallback
    return write_results(out, task, rows, protocol)


def _child_argv(opts: EvalOptions, rank: int) -> list[str]:
    argv = [sys.executable, "-m", "train", "eval", "--model", str(opts.model), "--task", opts.task,
            "--data-root", str(opts.data_root), "--output", str(opts.output), "--rank", str(rank),
            "--world-size", str(opts.nproc)]
    for flag, value in (("--limit", opts.limit), ("--max-frames", opts.max_frames), ("--device", opts.device),
                        ("--dtype", opts.dtype), ("--siglip-path", opts.siglip_path), ("--dino-path", opts.dino_path)):
        if value is not None:
            argv += [flag, str(value)]
    for flag, on in (("--subtitles", opts.subtitles), ("--compat-fallback", opts.compat_fallback),
                     ("--subset-only", opts.subset_only)):
        if on:
            argv.append(flag)
    return argv


def launch_ranks(opts: EvalOptions) -> int:
    """Run ranks 0..nproc-1 as child processes; returns the first non-zero exit code, else 0."""
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // opts.nproc)))
    procs = [subprocess.Popen(_child_argv(opts, r), env=env) for r in range(opts.nproc)]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def evaluate(opts: EvalOptions) -> dict:
    """The whole run: answer every question not yet answered (in-process or over nproc ranks), merge,
    score, print the summary table. Returns results.json's content."""
    from train.evaluation.answer import answer_rank

    questions = load_benchmark(opts)
    opts.output.mkdir(parents=True, exist_ok=True)
    if opts.nproc > 1:
        code = launch_ranks(opts)
        if code:
            raise RankFailed(f"a rank exited with status {code}; rerun to resume ({opts.output})")
    else:
        answer_rank(opts, questions, 0, 1)
    rows = merge(opts.output, questions)
    protocol = BENCHMARKS[opts.task].PROTOCOL.describe(opts.compat_fallback, opts.subtitles, opts.max_frames)
    results = write_results(opts.output, opts.task, rows, protocol)
    print(summary_table(results), flush=True)
    return results

