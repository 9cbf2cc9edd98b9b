"""Counting bad samples during training, and aborting when there are too many."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from data.dataset import SkippedSample

logger = logging.getLogger(__name__)


class TooManyBadSamples(RuntimeError):
    """The fraction of unusable samples passed the configured limit."""


@dataclass
class BadSampleTracker:
    """Counts loaded and skipped samples; raises TooManyBadSamples past ``max_bad_fraction``.

    The check starts once ``min_samples`` samples have been seen, so that one bad record early in
    a run does not abort it. ``seen``/``bad``/``by_code`` count this process's samples; ``restore``
    adds the counts of the run before a resume (from its checkpoint), which ``totals`` includes once.
    """

    max_bad_fraction: float = 0.01
    min_samples: int = 100
    seen: int = 0
    bad: int = 0
    by_code: Counter = field(default_factory=Counter)
    before: dict = field(default_factory=lambda: {"seen": 0, "bad": 0, "by_code": {}})  # restored run counts
    steps_without_update: int = 0  # optimizer steps whose samples were all bad, on every rank (this process)

    def update(self, n_good: int, skipped: Iterable[SkippedSample], check: bool = True) -> None:
        """Record a batch: ``n_good`` usable samples plus the skipped ones (each is logged); ``check``:
        apply the limit to this process's counts (a distributed run checks the run's counts instead)."""
        skipped = list(skipped)
        self.seen += n_good + len(skipped)
        for s in skipped:
            self.bad += 1
            self.by_code[s.code] += 1
            logger.warning("bad sample %d (id %r) skipped: [%s] %s%s", s.index, s.sample_id, s.code, s.reason,
                           f" ({s.path})" if s.path else "")
        if check:
            self.check(self.summary())

    def check(self, counts: dict) -> None:
        """Raise TooManyBadSamples when ``counts`` (a ``summary()``-shaped dict) pass the limit."""
        seen, bad = counts["seen"], counts["bad"]
        if seen >= self.min_samples and bad > self.max_bad_fraction * seen:
            raise TooManyBadSamples(
                f"{bad} of {seen} samples ({bad / seen:.1%}) could not be loaded, more than "
                f"the limit of {self.max_bad_fraction:.1%}; problems: {dict(counts['by_code'])}. "
                "Run `longvu data validate` on the manifest to list them.")

    def summary(self) -> dict:
        """This process's counts since it started."""
        return {"seen": self.seen, "bad": self.bad, "by_code": dict(self.by_code)}

    def restore(self, counts: dict) -> None:
        """Carry the run's counts from before a resume (``totals()`` as saved in the checkpoint)."""
        self.before = {"seen": int(counts["seen"]), "bad": int(counts["bad"]), "by_code": dict(counts["by_code"]),
                       "steps_without_update": int(counts.get("steps_without_update", 0))}

    def totals(self, per_rank: list[dict] | None = None) -> dict:
        """The run's counts: every rank's ``summary()`` (``per_rank``; default this process's only),
        plus the restored counts from before a resume."""
        per_rank = per_rank if per_rank is not None else [self.summary()]
        codes = Counter(self.before["by_code"])
        for counts in per_rank:
            codes.update(counts["by_code"])
        return {"seen": self.before["seen"] + sum(c["seen"] for c in per_rank),
                "bad": self.before["bad"] + sum(c["bad"] for c in per_rank), "by_code": dict(codes),
                "steps_without_update": self.before.get("steps_without_update", 0) + self.steps_without_update}


def track_bad_samples(batches: Iterable[dict], tracker: BadSampleTracker, skip_empty: bool = True) -> Iterator[dict]:
    """Feed each collated batch's ``skipped`` list to ``tracker`` and remove the key.

    A batch in which every sample was bad is dropped when ``skip_empty`` (after counting).
    """
    for batch in batches:
        skipped = batch.pop("skipped", [])
        tracker.update(len(batch["sample_ids"]), skipped)
        if skip_empty and not batch["sample_ids"]:
            continue
        yield batch
