"""Encode a video once, ask many questions: a cache of the expensive vision work per media item.

Of the visual pipeline (longvu.visual), only two things depend on the prompt:
- whether temporal reduction runs (`selects_frames`): a function of the regime budget, i.e. of the
  prompt LENGTH;
- the regime / hi-lo mixing / STC step (`item_tokens`): the budgets and the question text.

`MediaCache` keeps, per pixel tensor and per value of `selects_frames`, the towers' + SVA + projector
output (`VisionFeatures`: kept frame indices [F'], hi [F', s*s, H], lo [F', low*low, H]) and re-runs
only `item_tokens` for each prompt. A question long enough to flip `selects_frames` gets its own
entry (computed once too), so results always equal an uncached `encode_media`.

    cache = MediaCache()
    model.generate(ids, **media, media_encoder=cache)   # towers run
    model.generate(ids2, **media, media_encoder=cache)  # towers skipped

The pixel tensors are matched by identity: pass the same tensor objects for every question.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longvu.visual import (MediaItem, MediaResult, Progress, VisionFeatures, item_tokens, selects_frames,
                           vision_features)


@dataclass
class _Entry:
    siglip: torch.Tensor
    dino: torch.Tensor
    height: int
    width: int
    is_video: bool
    selects: bool
    features: VisionFeatures


class MediaCache:
    """A `media_encoder` for `LongVUForCausalLM.prepare_multimodal_inputs` / `generate` (see module doc).

    `encodes` counts the items whose vision features were computed (cache misses); `progress` is
    passed to `vision_features` (see `longvu.visual.Progress`)."""

    def __init__(self, progress: Progress | None = None):
        self._entries: list[_Entry] = []
        self.encodes = 0
        self.progress = progress

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def _find(self, item: MediaItem, selects: bool) -> _Entry | None:
        for e in self._entries:
            if (e.siglip is item.siglip and e.dino is item.dino and e.selects == selects
                    and (e.height, e.width, e.is_video) == (item.height, item.width, item.is_video)):
                return e
        return None

    def __call__(self, model, items: list[MediaItem], score_text: list[torch.Tensor | None]) -> list[MediaResult]:
        """Same contract as `longvu.visual.encode_media`: `model` is the LongVUModel."""
        keys = [selects_frames(model.config, it) for it in items]
        missing = [(it, sel) for it, sel in zip(items, keys) if self._find(it, sel) is None]
        if missing:
            for (it, sel), feats in zip(missing, vision_features(model, [it for it, _ in missing], self.progress)):
                self._entries.append(_Entry(it.siglip, it.dino, it.height, it.width, it.is_video, sel, feats))
            self.encodes += len(missing)
        return [item_tokens(model, it, self._find(it, sel).features, text)
                for it, sel, text in zip(items, keys, score_text)]
