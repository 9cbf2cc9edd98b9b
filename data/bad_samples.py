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
    a run does not abort it.
    """

    max_bad_fraction: float = 0.01
    min_samples: int = 100
    seen: int = 0
    bad: int = 0
    by_code: Counter = field(default_factory=Counter)

    def update(self, n_good: int, skipped: Iterable[SkippedSample]) -> None:
        """Record a batch: ``n_good`` usable samples plus the skipped ones (each is logged)."""
        skipped = list(skipped)
        self.seen += n_good + len(skipped)
        for s in skipped:
            self.bad += 1
            self.by_code[s.code] += 1
            logger.warning("bad sample %d (id %r) skipped: [%s] %s%s", s.index, s.sample_id, s.code, s.reason,
                           f" ({s.path})" if s.path else "")
        if self.seen >= self.min_samples and self.bad > self.max_bad_fraction * self.seen:
            raise TooManyBadSamples(
                f"{self.bad} of {self.seen} samples ({self.bad / self.seen:.1%}) could not be loaded, more than "
                f"the limit of {self.max_bad_fraction:.1%}; problems: {dict(self.by_code)}. "
                "Run `longvu data validate` on the manifest to list them.")

    def summary(self) -> dict:
        """Counts for logging at the end of a run."""
        return {"seen": self.seen, "bad": self.bad, "by_code": dict(self.by_code)}


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
