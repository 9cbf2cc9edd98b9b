"""Answer parsing and scoring shared by every benchmark.

Parsing follows the original LongVU evaluation (spec §8): strip the stop string `<|im_end|>`, delete
the word "Answer", take the first option letter, strip the parentheses. Its bugs are fixed and
counted instead of hidden (spec §9.11):

- no letter at all: status `unparsed`, `pred` None, scored wrong (the original crashes);
- a letter that is not one of the question's options: status `out_of_range`, scored wrong (the
  original silently answers "C"); with `compat_fallback=True` it becomes "C" as in the original
  (status `fallback`), so a published number can be compared;
- a letter counts only as a whole token: "Based on ..." is not "B" (the original EgoSchema regex
  matches capitals inside words).

A question whose video is missing or broken has no output: status `missing_media`, scored wrong and
listed in the results. A question of the benchmark that has no row at all after a merge (a row lost
to an interrupted write) gets a placeholder row: status `no_row`, scored wrong, listed, retried on resume.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

STOP = "<|im_end|>"
FALLBACK_LETTER = "C"  # the original's replacement for an invalid letter (option index 2)
STATUSES = ("ok", "unparsed", "out_of_range", "fallback", "missing_media", "no_row")


def option_letters(n: int) -> str:
    """The letters of `n` options: 3 -> "ABC"."""
    if not 1 <= n <= 26:
        raise ValueError(f"{n} options: expected 1..26")
    return "".join(chr(ord("A") + i) for i in range(n))


@dataclass(frozen=True)
class Parsed:
    """A parsed answer: `pred` the letter (None when unparsed) and the status (see STATUSES)."""

    pred: str | None
    status: str


def _letter_pattern(letters: str) -> re.Pattern:
    # a capital from `letters` with no letter right before or after it: "(B)", "B.", " B " but not "Based"
    return re.compile(rf"(?<![A-Za-z])[{letters}](?![A-Za-z])")


def parse_answer(output: str, n_options: int, search_letters: str, compat_fallback: bool = False) -> Parsed:
    """Parse a generated answer.

    output: the raw generated text; n_options: the question's option count (valid letters
    A.. option_letters(n_options)); search_letters: the letters the benchmark's regex looks for
    (e.g. "ABCDE"; extended to the question's own letters when it has more options)."""
    valid = option_letters(n_options)
    letters = "".join(sorted(set(search_letters) | set(valid)))
    text = output.replace(STOP, "").strip().replace("Answer", "")
    hit = _letter_pattern(letters).search(text)
    if hit is None:
        return Parsed(None, "unparsed")
    letter = hit.group(0)
    if letter in valid:
        return Parsed(letter, "ok")
    if compat_fallback:
        return Parsed(FALLBACK_LETTER, "fallback")
    return Parsed(letter, "out_of_range")


def score_row(row: dict, search_letters: str, compat_fallback: bool) -> dict:
    """Recompute `pred`, `status` and `correct` of a predictions row from its `output`, `answer` and
    `n_options` (a row without output is `missing_media`, or `no_row` for merge's placeholder).
    Returns a new row."""
    row = dict(row)
    if row.get("output") is None:
        row.update(pred=None, status="no_row" if row.get("no_row") else "missing_media")
    else:
        parsed = parse_answer(row["output"], row["n_options"], search_letters, compat_fallback)
        row.update(pred=parsed.pred, status=parsed.status)
    gold = row.get("answer")
    valid = row["status"] in ("ok", "fallback")
    row["correct"] = None if gold is None else bool(valid and row["pred"] == gold)
    return row


def _percent(hits: int, n: int) -> float:
    return 100.0 * hits / n if n else 0.0


def summarize(rows: list[dict], task: str, protocol: dict, aggregate: str) -> dict:
    """results.json from scored rows.

    aggregate: "micro" (overall = correct / scored questions) or "task_mean" (overall = the mean of
    the per-task accuracies, MLVU's M-avg). Rows without a gold answer (EgoSchema's full set) are
    counted in `n_unscored`, not in `n`."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    counts = dict.fromkeys(STATUSES, 0)
    for row in rows:
        counts[row["status"]] += 1
        if row.get("correct") is not None:
            by_task[row["task"]].append(row["correct"])
    per_task = {t: _percent(sum(v), len(v)) for t, v in sorted(by_task.items())}
    n = sum(len(v) for v in by_task.values())
    if aggregate == "task_mean":
        overall = sum(per_task.values()) / len(per_task) if per_task else 0.0
    else:
        overall = _percent(sum(sum(v) for v in by_task.values()), n)
    listed = lambda status: [r["question_id"] for r in rows if r["status"] == status]  # noqa: E731
    return {
        "task": task, "protocol": protocol, "n": n, "overall": overall, "per_task": per_task,
        "per_task_n": {t: len(v) for t, v in sorted(by_task.items())},
        "unparsed": counts["unparsed"], "out_of_range": counts["out_of_range"], "fallback": counts["fallback"],
        "missing_media": counts["missing_media"], "no_row": counts["no_row"], "n_unscored": len(rows) - n,
        "unparsed_ids": listed("unparsed"), "out_of_range_ids": listed("out_of_range"),
        "fallback_ids": listed("fallback"), "no_row_ids": listed("no_row"),
        "errors": [{"question_id": r["question_id"], "error": r.get("error")} for r in rows
                   if r["status"] == "missing_media"],
    }


def summary_table(results: dict) -> str:
    """A plain-text table of results.json: one line per sub-task, then overall and the counts."""
    lines = [f"{results['task']}: {results['n']} questions scored", f"{'task':<32} {'n':>6} {'acc %':>7}"]
    for name, acc in results["per_task"].items():
        lines.append(f"{name:<32} {results['per_task_n'][name]:>6} {acc:>7.2f}")
    lines.append(f"{'overall':<32} {results['n']:>6} {results['overall']:>7.2f}")
    lines.append(f"unparsed {results['unparsed']}, out of range {results['out_of_range']}, "
                 f"fallback {results['fallback']}, missing media {results['missing_media']}, "
                 f"no row {results['no_row']}")
    return "\n".join(lines)
