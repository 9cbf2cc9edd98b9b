"""From media pixels to the visual token sequence of each media item (DESIGN.md data flow step 6).

DINOv2 on all frames (streamed in chunks, temporal reduction on the fly) -> SigLIP on kept frames ->
aux projectors -> SVA -> projector -> resolution regime -> unpad + newlines -> mixing or STC.
Tower, SVA and projector work is batched over all frames of all media items in the batch.

A media item holds either both towers' pixels or its uint8 frames (long videos): frames are then
moved to the model's device, padded, resized and normalised there one tower chunk at a time
(`longvu.processing.tower_pixels`), so no full-clip pixel tensor ever exists. DINO features of
candidate frames beyond `DEVICE_FEATURE_FRAMES` wait on the CPU until selection is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.profiler import record_function

from longvu.compression import (
    Regime,
    cap_frames,
    choose_regime,
    frame_budget,
    frame_text_scores,
    highres_frame_count,
    mix_resolutions,
    select_frames,
    spatial_token_compression,
    window_mean_similarity,
)
from longvu.layout import content_box, content_mask, unpad_with_newlines
from longvu.processing import tower_pixels
from longvu.sva import cell_key_mask, split_into_cells
from longvu.token_grid import resize_token_grid

# DINO features of selection candidates held on the device per item; later ones wait on the CPU.
DEVICE_FEATURE_FRAMES = 1024
# Frames per SVA + projector call at inference (their work is per frame; this bounds its memory).
CONNECT_CHUNK = 64

# progress(stage, done, total): called as the towers work through a clip ("dino", "siglip").
Progress = Callable[[str, int, int], None]


@dataclass
class MediaItem:
    """One image or video. siglip [T,3,S,S], dino [T,3,D,D] pixels, or both the same uint8 RGB frames
    [T,H,W,3] (any device; preprocessed per chunk on the model's device); height/width of the original
    frames.

    regime_budget: visual budget for frame selection and the regime (text counted with placeholders);
    token_budget: visual budget for mixing and STC (text tokens only) — both as in the reference."""

    siglip: torch.Tensor
    dino: torch.Tensor
    height: int
    width: int
    is_video: bool
    regime_budget: int
    token_budget: int

    def __post_init__(self):
        if (self.siglip.dtype == torch.uint8) != (self.dino.dtype == torch.uint8) or (
                self.raw and self.siglip.shape != self.dino.shape):
            raise ValueError(f"media item: uint8 frames [T,H,W,3] go in both pixel_values_siglip and pixel_values_dino "
                             f"(the same frames), got {self.siglip.dtype} {tuple(self.siglip.shape)} and "
                             f"{self.dino.dtype} {tuple(self.dino.shape)}")

    @property
    def raw(self) -> bool:
        """Whether the item holds uint8 frames rather than tower pixels."""
        return self.dino.dtype == torch.uint8


def _pixels(model, item: MediaItem, tower: int, index: slice | torch.Tensor) -> torch.Tensor:
    """Tower `tower`'s (0 SigLIP, 1 DINO) pixels [n,3,S,S] of the frames `index` selects: sliced from the
    item's pixels, or made on the model's device from its uint8 frames."""
    source = item.dino if tower == 1 else item.siglip
    if isinstance(index, torch.Tensor):
        index = index.to(source.device)
    if not item.raw:
        return source[index]
    cfg = model.config
    frames = source[index].to(_vision_device(model), non_blocking=True)
    if tower == 1:
        return tower_pixels(frames, "dino", cfg.dino_image_size)
    return tower_pixels(frames, "siglip", cfg.siglip_image_size)


def _chunks(model, item: MediaItem, tower: int, chunk: int) -> Iterator[torch.Tensor]:
    """All frames' pixels for one tower, `chunk` frames at a time."""
    for start in range(0, item.dino.shape[0], chunk):
        yield _pixels(model, item, tower, slice(start, start + chunk))


def _kept_chunks(model, items: list[MediaItem], kept: list[torch.Tensor], chunk: int) -> Iterator[torch.Tensor]:
    """SigLIP pixels of every item's kept frames (item order), `chunk` frames at a time across items."""
    owner = torch.cat([torch.full((k.numel(),), i, dtype=torch.long) for i, k in enumerate(kept)])
    frame = torch.cat([k.cpu() for k in kept])
    for start in range(0, frame.numel(), chunk):
        o, f = owner[start:start + chunk], frame[start:start + chunk]
        parts = [_pixels(model, items[i], 0, f[o == i]) for i in o.unique().tolist()]
        yield torch.cat(parts) if len(parts) > 1 else parts[0]


@dataclass
class MediaResult:
    """Visual tokens [N, hidden] of one item and what the pipeline decided."""

    tokens: torch.Tensor
    frames_in: int
    kept_indices: torch.Tensor
    regime: str
    highres_frames: list[int] = field(default_factory=list)


def _read_size(item: MediaItem, swap_video_hw: bool) -> tuple[int, int]:
    """The (width, height) that unpadding and masks use; decoded video sizes swapped under the compat switch."""
    if item.is_video and swap_video_hw:
        return item.height, item.width
    return item.width, item.height


def selects_frames(config, item: MediaItem) -> bool:
    """Whether temporal reduction applies to `item`: a video with at least as many frames as its
    regime budget allows at the nominal per-frame cost. The only budget-dependent vision decision."""
    tpf = config.lowres_token ** 2 if config.highres else config.image_token_len
    return item.is_video and item.dino.shape[0] >= frame_budget(item.regime_budget, tpf)


def _stream_dino(model, item: MediaItem, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO features of the kept frames [K, G*G, C] and their indices [K].

    Runs chunk by chunk (whole windows per chunk) and holds on to the features of frames below the
    threshold only (beyond DEVICE_FEATURE_FRAMES of them, on the CPU); which frames are kept is
    `select_frames` on the whole clip's window similarities."""
    cfg = model.config
    dino = model.towers[1]
    n = item.dino.shape[0]
    device = _vision_device(model)
    if not selects_frames(cfg, item):
        feats = dino(_chunks(model, item, 1, dino.chunk_size)) if item.raw else dino(item.dino)
        return feats, torch.arange(n, device=device)
    chunk = cfg.dino_window * max(1, 64 // cfg.dino_window)
    feats, below, sims, held = [], [], [], 0
    for start in range(0, n, chunk):
        f = dino(_pixels(model, item, 1, slice(start, start + chunk)))
        s = window_mean_similarity(f, cfg.dino_window)
        keep = s < cfg.dino_threshold
        f = f[keep]
        held += f.shape[0]
        feats.append(f if held <= DEVICE_FEATURE_FRAMES or device.type == "cpu" else f.cpu())
        below.append(torch.nonzero(keep).squeeze(1) + start)
        sims.append(s)
        if progress is not None:
            progress("dino", min(start + chunk, n), n)
    kept = select_frames(torch.cat(sims), cfg.dino_threshold, cfg.max_selected_frames)
    return _gather_rows(feats, torch.searchsorted(torch.cat(below), kept), device), kept


def _dino_features(model, items: list[MediaItem], progress: Progress | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`_stream_dino` of every item, except that items keeping all their frames (images, short videos)
    share tower calls: consecutive ones are batched up to the tower's chunk size, so a batch of images
    costs one DINO call, not one per image (each call's ~40 layers of kernel launches, CPU-bound)."""
    cfg, dino = model.config, model.towers[1]
    out: list = [None] * len(items)
    group: list[int] = []

    def flush():
        if len(group) == 1:
            out[group[0]] = _stream_dino(model, items[group[0]], progress)
        elif group:
            device = _vision_device(model)
            feats = dino(torch.cat([_pixels(model, items[i], 1, slice(None)).to(device) for i in group]))
            for i, f in zip(group, feats.split([items[i].dino.shape[0] for i in group])):
                out[i] = f, torch.arange(f.shape[0], device=device)
        group.clear()

    for i, item in enumerate(items):
        if selects_frames(cfg, item) or item.dino.shape[0] >= dino.chunk_size:
            flush()
            out[i] = _stream_dino(model, item, progress)
            continue
        if sum(items[j].dino.shape[0] for j in group) + item.dino.shape[0] > dino.chunk_size:
            flush()
        group.append(i)
    flush()
    return out


def _gather_rows(parts: list[torch.Tensor], rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows `rows` [K] (ascending) of the concatenation of `parts` (on any devices) -> [K, ...] on
    `device`, part by part (the concatenation itself is never built)."""
    out, offset = [], 0
    rows = rows.cpu()
    for p in parts:
        mine = rows[(rows >= offset) & (rows < offset + p.shape[0])] - offset
        if mine.numel():
            out.append(p[mine.to(p.device)].to(device))
        offset += p.shape[0]
    return torch.cat(out) if len(out) != 1 else out[0]


def _vision_device(model) -> torch.device:
    """Where the vision path runs: the frozen towers' device. (Never read it from a trainable tensor: under
    ZeRO-3 touching a partitioned parameter outside its forward all-gathers it, on this rank only.)"""
    return next(model.towers[1].parameters()).device


def _sva(model, siglip_feats: torch.Tensor, dino_feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Tower features [N, G*G, Ct] + content masks [N, G, G] -> SVA query features [N, Q, C]."""
    cfg = model.config
    side = cfg.query_side
    dtype = model.mm_projector[0].weight.dtype
    projected = [
        model.mm_projector_aux_0(siglip_feats.to(dtype)),
        model.mm_projector_aux_1(dino_feats.to(dtype)),
    ]
    n, _, dim = projected[0].shape
    context = projected[0].mean(dim=1).repeat_interleave(side * side, dim=0)  # [N*Q, C]
    cells = [split_into_cells(p, side) for p in projected]
    key_mask = cell_key_mask(masks.to(projected[0].device), side)
    key_mask = key_mask.repeat(1, len(cells))
    query = model.vision_query[0].to(dtype).expand(n * side * side, dim)
    out = model.vision_sampler_0(query, context, cells, key_mask)
    return out.view(n, side * side, dim)


def _layout(hidden: torch.Tensor, side: int, width: float, height: float, newline: torch.Tensor) -> torch.Tensor:
    """Projected grids [F, side*side, H] -> unpad + newlines -> [F, T, H]."""
    grid = hidden.view(hidden.shape[0], side, side, -1)
    return unpad_with_newlines(grid, content_box(side, side, width, height), newline)


def _project(model, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One projector call for the high-res [N, s*s, C] and low-res [N, low*low, C] grids of all frames
    -> (hi [N, s*s, H], lo [N, low*low, H]). Every forward calls each trainable module exactly once,
    whatever the media, so ZeRO-3 ranks stay in step."""
    cfg = model.config
    n, q, c = queries.shape
    low = resize_token_grid(queries, cfg.lowres_token)
    hidden = model.mm_projector(torch.cat([queries.reshape(-1, c), low.reshape(-1, c)]))
    hi, lo = hidden.split([n * q, n * low.shape[1]])
    return hi.view(n, q, -1), lo.view(n, low.shape[1], -1)


def zero3_partitioned(model) -> bool:
    """Whether DeepSpeed's ZeRO-3 partitions the connector's parameters (it gives each a `ds_id`): then
    every rank must call each module as often as the others."""
    return hasattr(model.mm_projector[0].weight, "ds_id")


def _connect(model, siglip_feats: torch.Tensor, dino_feats: torch.Tensor, masks: torch.Tensor):
    """SVA + projector on all frames -> (hi [N, s*s, H], lo [N, low*low, H]). At inference (no grad,
    parameters not partitioned by ZeRO-3, whose ranks must call each module equally often) it runs
    CONNECT_CHUNK frames at a time; in training in one call, as `_project` requires."""
    with record_function("longvu/connector"):
        if torch.is_grad_enabled() or zero3_partitioned(model) or siglip_feats.shape[0] <= CONNECT_CHUNK:
            return _project(model, _sva(model, siglip_feats, dino_feats, masks))
        parts = [_project(model, _sva(model, s, d, m)) for s, d, m in
                 zip(siglip_feats.split(CONNECT_CHUNK), dino_feats.split(CONNECT_CHUNK), masks.split(CONNECT_CHUNK))]
        return torch.cat([hi for hi, _ in parts]), torch.cat([lo for _, lo in parts])


@dataclass
class VisionFeatures:
    """Projected grids of one item's kept frames: kept [F'] frame indices, hi [F', s*s, H], lo [F', low*low, H].
    Everything before the regime/mixing/STC step; depends on the budget only through `selects_frames`."""

    kept: torch.Tensor
    hi: torch.Tensor
    lo: torch.Tensor


def encode_media(model, items: list[MediaItem], score_text: list[torch.Tensor | None]) -> list[MediaResult]:
    """Visual tokens for every media item of a batch. `model` is a LongVUModel; score_text[i] [L, hidden]
    is the text that ranks item i's frames for the high-res upgrade (None when not needed)."""
    return [item_tokens(model, it, f, text) for it, f, text in zip(items, vision_features(model, items), score_text)]


def vision_features(model, items: list[MediaItem], progress: Progress | None = None) -> list[VisionFeatures]:
    """Towers (DINO on all frames, SigLIP on kept ones), SVA and projector for every item, batched.
    `progress` hears about the towers' chunks (see `Progress`)."""
    cfg = model.config
    swap = cfg.compat_swap_video_hw
    dino_kept = _dino_features(model, items, progress)
    kept = [idx for _, idx in dino_kept]
    siglip = model.towers[0]
    if any(it.raw for it in items):
        siglip_feats = siglip(_kept_chunks(model, items, kept, siglip.chunk_size))
    else:
        siglip_feats = siglip(torch.cat([it.siglip[idx.to(it.siglip.device)] for it, idx in zip(items, kept)]))
    if progress is not None:
        progress("siglip", sum(k.numel() for k in kept), sum(k.numel() for k in kept))
    dino_feats = torch.cat([f for f, _ in dino_kept])
    del dino_kept
    masks = torch.cat([
        content_mask(cfg.tower_grid, *_read_size(it, swap)).expand(idx.numel(), -1, -1)
        for it, idx in zip(items, kept)
    ])
    hi, lo = _connect(model, siglip_feats, dino_feats, masks)
    sizes = [idx.numel() for idx in kept]
    return [VisionFeatures(idx, h, l) for h, l, idx in zip(hi.split(sizes), lo.split(sizes), kept)]


def dummy_visual_anchor(model, device: torch.device) -> torch.Tensor:
    """A zero scalar computed through the vision path on one blank frame, for batches without media:
    adding it changes nothing but keeps every rank's module calls (and gradients) identical. Frozen
    towers hold no trained parameter and sit outside DeepSpeed, so their part is skipped: zero
    features [1, grid_side**2, hidden] go to the connector (compiled towers would otherwise pad the
    one frame to a 64-frame chunk: ~0.25 s of every text-only step of the 7B on an H200)."""
    cfg = model.config
    sizes = (cfg.siglip_image_size, cfg.dino_image_size)
    feats = [tower(torch.zeros(1, 3, size, size, device=device))
             if any(p.requires_grad for p in tower.parameters()) else
             torch.zeros(1, tower.grid_side ** 2, tower.hidden_size, device=device,
                         dtype=next(tower.vision_tower.parameters()).dtype)
             for tower, size in zip(model.towers, sizes)]
    masks = torch.ones(1, cfg.tower_grid, cfg.tower_grid, dtype=torch.bool, device=device)
    hi, lo = _project(model, _sva(model, feats[0], feats[1], masks))
    return (hi.sum() + lo.sum() + model.image_newline.sum()) * 0.0


def item_tokens(model, item: MediaItem, features: VisionFeatures, text: torch.Tensor | None) -> MediaResult:
    """The cheap, prompt-dependent step for one item: regime, layout, mixing by `text` [L, H], STC."""
    hi, lo, kept = features.hi, features.lo, features.kept
    cfg = model.config
    side, low = cfg.query_side, cfg.lowres_token
    width, height = _read_size(item, cfg.compat_swap_video_hw)
    ratio = side / low
    n = hi.shape[0]
    newline = model.image_newline

    def lowres_tokens():
        return _layout(lo, low, int(width / ratio), int(height / ratio), newline)

    if not item.is_video:
        if cfg.highres and cfg.compat_lowres_single_image:
            return MediaResult(lowres_tokens().flatten(0, 1), n, kept, "image-lowres")
        return MediaResult(_layout(hi, side, width, height, newline).flatten(0, 1), n, kept, "image")

    frames_in = item.dino.shape[0]
    regime = Regime.HIGH
    if cfg.highres and cfg.image_token_len > low * low:
        regime = choose_regime(n, item.regime_budget, cfg.image_token_len, low * low)
    highres = _layout(hi, side, width, height, newline)  # [F', Th, H]
    if regime is Regime.MIX:
        lowres = lowres_tokens()
        k = highres_frame_count(item.token_budget, n, lowres.shape[1], highres.shape[1])
        if k >= 1:
            upgraded = _frames_to_upgrade(lowres, text, k, cfg.compat_dot_product_scoring)
            tokens = mix_resolutions(lowres, highres, upgraded)
            return MediaResult(tokens, frames_in, kept, "mix", kept[upgraded].tolist())
        frames = lowres
    else:
        frames = highres
    if frames.shape[0] * frames.shape[1] > item.token_budget:
        tokens = spatial_token_compression(frames, cfg.drop_threshold, item.token_budget, cfg.stc_chunk)
        return MediaResult(tokens, frames_in, kept, f"{regime.value}+stc")
    return MediaResult(frames.flatten(0, 1), frames_in, kept, regime.value)


def _frames_to_upgrade(lowres: torch.Tensor, text: torch.Tensor | None, k: int, dot_product: bool) -> torch.Tensor:
    """Sorted indices of the k frames most relevant to the text; evenly spaced frames when there is no text."""
    if text is None or text.shape[0] == 0:
        return cap_frames(torch.arange(lowres.shape[0], device=lowres.device), k)
    scores = frame_text_scores(lowres, text, dot_product)
    return torch.topk(scores, k).indices.sort().values
