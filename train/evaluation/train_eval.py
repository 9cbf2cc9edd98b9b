"""Evaluation during training (`training.eval`): MCQ accuracy on a held-out manifest, next to the
Trainer's eval loss.

An MCQ record is a manifest record that also carries `options` (a list of option texts) and
`answer` (the gold letter); its conversation is the question (with the options) and the answer.
Accuracy is scored by the loglikelihood of the option letters: the prompt is the record's sample up
to its assistant header, and the prediction is the letter, among the record's options, whose first
token has the highest logit at the last position. Each rank scores every world-th record and runs
the same number of forwards (a rank with fewer records repeats one, uncounted), so ZeRO-3 ranks
stay in step; the counts are summed over ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longvu.constants import IGNORE_INDEX
from train.evaluation.mcq_records import mcq_indices


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


@torch.no_grad()
def mcq_accuracy(model, dataset, tokenizer, device, rank: int = 0, world: int = 1) -> tuple[float, int]:
    """(accuracy in percent, questions scored) over every rank; records that fail to load are skipped."""
    from data.dataset import Sample

    indices = mcq_indices(dataset.records)
    mine = indices[rank::world]
    steps = -(-len(indices) // world)
    hits = total = 0
    was_training = model.training
    model.eval()
    for step in range(steps):
        index = mine[step] if step < len(mine) else (mine or indices)[0]
        sample = dataset[index]
        if not isinstance(sample, Sample):
            continue
        rec = dataset.records[index]
        pred = _predict(model, sample, tokenizer, len(rec["options"]), device)
        if step < len(mine):
            hits += int(chr(ord("A") + pred) == rec["answer"])
            total += 1
    model.train(was_training)
    counts = torch.tensor([hits, total], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    hits, total = counts.tolist()
    return (100.0 * hits / total if total else 0.0), int(total)
