"""Batch sampler grouping samples by modality and estimated length under a token budget.

Per epoch (deterministic given ``seed`` and ``epoch``, identical on every rank):

1. indices are split by modality ("image", "video", "text") and shuffled within each group;
2. each group is cut into windows of ``window`` samples, each window sorted by length (longest
   first), and packed greedily into batches whose padded cost ``batch_size * longest`` stays within
   ``max_tokens`` (and at most ``max_batch_size`` samples). A sample longer than ``max_tokens`` on
   its own gets a batch of one (it is never dropped; a warning is logged);
3. all batches are shuffled together, so modalities interleave but never mix inside a batch;
4. the epoch's batches not yet consumed (all of them, unless resuming) are padded to a multiple of
   ``world_size`` by repeating the epoch's first batches, and rank ``r`` takes batches ``r, r +
   world_size, ...`` of them.

Resuming mid-epoch: ``resume_at(epoch, consumed)`` continues after the first ``consumed`` batches of
the epoch's list, however many ranks consumed them (so a run resumed on another process count
repeats and skips no sample).

``PackingBatchSampler`` (``data.packing``) makes packs instead: modalities mixed, each window packed
first-fit by decreasing length so that the estimated lengths of a pack sum to at most ``max_tokens``
(the model packs what it really gets; an over-estimate only leaves the row shorter).
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


class ModalityLengthBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices; see the module docstring."""

    def __init__(self, lengths: Sequence[int], modalities: Sequence[str], max_tokens: int, max_batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, window: int = 256) -> None:
        if len(lengths) != len(modalities):
            raise ValueError(f"{len(lengths)} lengths but {len(modalities)} modalities")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if max_tokens < 1 or max_batch_size < 1:
            raise ValueError("max_tokens and max_batch_size must be positive")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.modalities = list(modalities)
        self.max_tokens = max_tokens
        self.max_batch_size = max_batch_size
        self.seed, self.rank, self.world_size, self.window = seed, rank, world_size, window
        self.epoch = 0
        self.consumed = 0  # batches of this epoch's list consumed before this run (all ranks)
        self._resume: tuple[int, int] | None = None
        too_long = int((self.lengths > max_tokens).sum())
        if too_long:
            logger.warning("%d samples are longer than max_tokens=%d; each gets a batch of its own",
                           too_long, max_tokens)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (reshuffles); a resumed epoch (`resume_at`) starts after its consumed batches."""
        self.epoch = epoch
        self.consumed = self._resume[1] if self._resume and self._resume[0] == epoch else 0

    def resume_at(self, epoch: int, consumed: int) -> int:
        """Continue epoch `epoch` after its first `consumed` batches (see the module docstring) once
        `set_epoch(epoch)` is called. -> the epoch that resumes (the next one if `epoch` was used up)."""
        self.epoch = epoch
        if consumed >= len(self.all_batches()):
            epoch, consumed = epoch + 1, 0
        self._resume = (epoch, consumed)
        self.epoch, self.consumed = epoch, 0  # len() stays the full epoch's until set_epoch(epoch)
        return epoch

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        batches: list[list[int]] = []
        for w in range(0, len(order), self.window):
            win = order[w : w + self.window]
            win = win[np.argsort(-self.lengths[win], kind="stable")]
            batch: list[int] = []
            longest = 0
            for i in win.tolist():
                new_longest = max(longest, int(self.lengths[i]))
                if batch and (len(batch) >= self.max_batch_size or new_longest * (len(batch) + 1) > self.max_tokens):
                    batches.append(batch)
                    batch, new_longest = [], int(self.lengths[i])
                batch.append(i)
                longest = new_longest
            if batch:
                batches.append(batch)
        return batches

    def all_batches(self) -> list[list[int]]:
        """Every batch of the epoch, for all ranks, before padding and sharding."""
        rng = np.random.default_rng([self.seed, self.epoch])
        mods = np.asarray(self.modalities)
        batches: list[list[int]] = []
        for modality in sorted(set(self.modalities)):
            group = np.flatnonzero(mods == modality)
            batches.extend(self._pack(rng.permutation(group)))
        perm = rng.permutation(len(batches))
        return [batches[i] for i in perm]

    def _rank_batches(self) -> list[list[int]]:
        batches = self.all_batches()
        rest = batches[self.consumed :]
        if not rest:
            return []
        extra = (-len(rest)) % self.world_size
        rest = rest + [batches[i % len(batches)] for i in range(extra)]
        return rest[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._rank_batches()

    def __len__(self) -> int:
        return len(self._rank_batches())


class PackingBatchSampler(ModalityLengthBatchSampler):
    """Yields packs: lists of dataset indices whose estimated lengths sum to at most ``max_tokens``
    (a longer sample alone); every modality in one group; shuffling, sharding and resuming as above."""

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 window: int = 256) -> None:
        super().__init__(lengths, ["any"] * len(lengths), max_tokens, max(1, len(lengths)), seed=seed, rank=rank,
                         world_size=world_size, window=window)

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        packs: list[list[int]] = []
        for w in range(0, len(order), self.window):
            win = order[w : w + self.window]
            bins: list[list[int]] = []
            used: list[int] = []
            for i in win[np.argsort(-self.lengths[win], kind="stable")].tolist():
                n = int(self.lengths[i])
                k = next((k for k, u in enumerate(used) if u + n <= self.max_tokens), len(bins))
                if k == len(bins):
                    bins.append([])
                    used.append(0)
                bins[k].append(i)
                used[k] += n
            packs.extend(bins)
        return packs


def batch_media_bound(lengths: Sequence[int], media: Sequence[int], max_tokens: int,
                      max_batch_size: int | None = None) -> int:
    """An upper bound on the media items (frames and images) one batch of either sampler can hold.

    A batch is one sample longer than ``max_tokens``, or samples whose lengths sum to at most
    ``max_tokens`` (and, unpacked, at most ``max_batch_size`` of them). For the latter the bound is
    the fractional knapsack by media per token (the densest samples first, the last one in part),
    and unpacked the sum of the ``max_batch_size`` largest counts if that is less."""
    lengths = np.maximum(np.asarray(lengths, dtype=np.int64), 1)
    media = np.asarray(media, dtype=np.int64)
    if len(lengths) != len(media):
        raise ValueError(f"{len(lengths)} lengths but {len(media)} media counts")
    alone = int(media[lengths > max_tokens].max(initial=0))
    fit_len, fit_media = lengths[lengths <= max_tokens], media[lengths <= max_tokens]
    order = np.argsort(-fit_media / fit_len, kind="stable")
    fit_len, fit_media = fit_len[order], fit_media[order]
    whole = int(np.searchsorted(np.cumsum(fit_len), max_tokens, side="right"))  # samples taken whole
    bound = int(fit_media[:whole].sum())
    if whole < len(fit_len):
        left = max_tokens - int(fit_len[:whole].sum())
        bound += -(-int(fit_media[whole]) * left // int(fit_len[whole]))  # the next one in part, rounded up
    if max_batch_size is not None:
        bound = min(bound, int(np.sort(fit_media)[::-1][:max_batch_size].sum()))
    return max(alone, bound)


def sampler_inputs(estimates: Sequence) -> tuple[list[int], list[str]]:
    """``(lengths, modalities)`` from ``data.metadata.estimate_lengths`` output.

    A record whose length could not be estimated (None) is kept, in its own "unknown" group with
    length 1, so that loading it fails visibly and is counted by the bad-sample tracker.
    """
    lengths = [e.total if e is not None else 1 for e in estimates]
    modalities = [e.modality if e is not None else "unknown" for e in estimates]
    return lengths, modalities
