"""Evaluation during training (`training.eval`): MCQ accuracy on a held-out manifest, next to the
Trainer's eval loss.

An MCQ record is a manifest record that also carries `options` (a list of option texts) and
`answer` (the gold letter); its conversation is the question (with the options) and the answer.
Accuracy is scored by the loglikelihood of the option letters: the prompt is the record's sample up
to its assistant header, and the prediction is the letter, among the record's options, whose first
token has the highest logit at the last position. Each rank scores every world-th record and runs
the same number of forwards (a rank with fewer records repeats one, uncounted; a record that fails
to load is replaced by a stand-in forward, uncounted, and reported), so ZeRO-3 ranks stay in step;
the counts are summed over ranks.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from longvu.constants import IGNORE_INDEX
from train.evaluation.mcq_records import mcq_indices

logger = logging.getLogger(__name__)


def letter_token_ids(tokenizer, n: int) -> list[int]:
    """The token id of each option letter "A".. (one token each in the Qwen2 vocabulary)."""
    return [tokenizer.encode(chr(ord("A") + k), add_special_tokens=False)[0] for k in range(n)]


def _predict(model, sample, tokenizer, n_options: int, device) -> int:
    """Index of the predicted option for one dataset Sample (input_ids [L], labels [L])."""
    first = int((sample.labels != IGNORE_INDEX).nonzero()[0, 0])
    ids = sample.input_ids[:first][None].to(device)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    media = dict(pixel_values_siglip=[m.siglip.to(device, dtype) for m in sample.media],
                 pixel_values_dino=[m.dino.to(device, dtype) for m in sample.media],
                 media_sizes=[m.size for m in sample.media], media_kinds=[m.kind for m in sample.media])
    logits = model(input_ids=ids, **(media if sample.media else {}), logits_to_keep=1).logits[0, -1]
    return int(logits[letter_token_ids(tokenizer, n_options)].argmax())


def stand_in_sample(tokenizer):
    """A text-only Sample (input_ids [2]: the letter "A" twice; labels [2]: the second is the answer) for
    the forward a rank still runs when a record fails to load before any other has loaded."""
    from data.dataset import Sample

    ids = torch.tensor(letter_token_ids(tokenizer, 1) * 2)
    return Sample(-1, "stand-in", ids, torch.tensor([IGNORE_INDEX, int(ids[1])]), [])


@torch.no_grad()
def mcq_accuracy(model, dataset, tokenizer, device, rank: int = 0, world: int = 1) -> tuple[float, int]:
    """(accuracy in percent, questions scored) over every rank. A record that fails to load is not
    scored: the rank runs its forward on the previous loaded sample (or `stand_in_sample`) instead,
    and the failures, summed over ranks, are logged."""
    from data.dataset import Sample

    indices = mcq_indices(dataset.records)
    mine = indices[rank::world]
    steps = -(-len(indices) // world)
    hits = total = failed = 0
    good = None
    was_training = model.training
    model.eval()
    for step in range(steps):
        index = mine[step] if step < len(mine) else (mine or indices)[0]
        sample, rec = dataset[index], dataset.records[index]
        if not isinstance(sample, Sample):
            failed += int(step < len(mine))
            _predict(model, good or stand_in_sample(tokenizer), tokenizer, 1, device)  # keeps ranks in step; not scored
            continue
        good = sample
        pred = _predict(model, sample, tokenizer, len(rec["options"]), device)
        if step < len(mine):
            hits += int(chr(ord("A") + pred) == rec["answer"])
            total += 1
    model.train(was_training)
    counts = torch.tensor([hits, total, failed], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    hits, total, failed = counts.tolist()
    if failed and rank == 0:
        logger.warning("MCQ accuracy: %d of %d record(s) failed to load and are not scored", failed, len(indices))
    return (100.0 * hits / total if total else 0.0), int(total)
