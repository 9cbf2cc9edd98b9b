"""Collating samples of any modality (image, video, text-only) into one batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.dataset import Sample, SkippedSample
from longvu.constants import IGNORE_INDEX, QWEN_ENDOFTEXT_ID

# Batch keys that are not model inputs; the trainer removes them before forward.
NON_MODEL_KEYS = ("sample_ids", "frames_decoded", "skipped")


@dataclass
class Collator:
    """Right-pads text and lists the batch's media in placeholder order.

    Returns a dict: ``input_ids [B, L]`` (padded with ``pad_id``), ``attention_mask [B, L]``,
    ``labels [B, L]`` (padded with -100), ``pixel_values_siglip: list[[T_i, 3, S, S]]``,
    ``pixel_values_dino: list[[T_i, 3, D, D]]``, ``media_sizes: list[FrameSize]``,
    ``media_kinds: list[str]`` (sample 0's media first, then sample 1's, ...), ``sample_ids:
    list[str]``, ``frames_decoded: LongTensor [B]`` and ``skipped: list[SkippedSample]``.
    Skipped samples are left out of the tensors; text-only samples get no media.

    ``pack=True`` (``data.packing``) adds ``pack_sequences: True``: the model runs the batch's samples
    as one packed row, each spliced and budgeted as on its own (``LongVUForCausalLM.forward``).
    """

    pad_id: int = QWEN_ENDOFTEXT_ID
    pad_to_multiple_of: int | None = None
    pack: bool = False

    def __call__(self, items: list[Sample | SkippedSample]) -> dict:
        samples = [s for s in items if isinstance(s, Sample)]
        skipped = [s for s in items if isinstance(s, SkippedSample)]
        length = max((len(s.input_ids) for s in samples), default=0)
        if self.pad_to_multiple_of and length:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        b = len(samples)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s.input_ids)
            input_ids[row, :n] = s.input_ids
            labels[row, :n] = s.labels
            attention[row, :n] = 1
        media = [m for s in samples for m in s.media]
        packing = {"pack_sequences": True} if self.pack else {}
        return packing | {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "pixel_values_siglip": [m.siglip for m in media],
            "pixel_values_dino": [m.dino for m in media],
            "media_sizes": [m.size for m in media],
            "media_kinds": [m.kind for m in media],
            "sample_ids": [s.sample_id for s in samples],
            "frames_decoded": torch.tensor([s.frames_decoded for s in samples], dtype=torch.long),
            "skipped": skipped,
        }
