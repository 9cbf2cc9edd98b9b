"""Where the image lies inside its padded square, on a token grid, and the unpad + newline layout.

Sizes are read as (width, height) here, as the reference's `unpad_image` reads them; callers decide
which named size that is (see `LongVUConfig.compat_swap_video_hw`).
"""

from __future__ import annotations

import torch


def content_box(grid_h: int, grid_w: int, width: float, height: float) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of the non-padding region of a `grid_h x grid_w` grid holding a
    `width x height` image padded to a centred square; integer rules of the reference
    (`int()` truncation, `(grid - kept) // 2` cut from both sides). Falls back to the whole grid
    when the cut would leave nothing."""
    if width / height > grid_w / grid_h:
        kept = int(height * (grid_w / width))
        pad = (grid_h - kept) // 2
        box = (pad, grid_h - pad, 0, grid_w)
    else:
        kept = int(width * (grid_h / height))
        pad = (grid_w - kept) // 2
        box = (0, grid_h, pad, grid_w - pad)
    if box[1] <= box[0] or box[3] <= box[2]:
        return (0, grid_h, 0, grid_w)
    return box


def content_mask(grid: int, width: float, height: float) -> torch.Tensor:
    """[grid, grid] bool: True inside `content_box`."""
    r0, r1, c0, c1 = content_box(grid, grid, width, height)
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    mask[r0:r1, c0:c1] = True
    return mask


def unpad_with_newlines(
    grid: torch.Tensor, box: tuple[int, int, int, int], newline: torch.Tensor
) -> torch.Tensor:
    """grid [F, h, w, C] -> [F, rows * (cols + 1), C]: crop to `box`, append `newline` [C] after each row."""
    r0, r1, c0, c1 = box
    cropped = grid[:, r0:r1, c0:c1]
    f, rows = cropped.shape[:2]
    nl = newline.to(cropped.dtype).view(1, 1, 1, -1).expand(f, rows, 1, -1)
    return torch.cat([cropped, nl], dim=2).reshape(f, -1, grid.shape[-1])


def tokens_per_frame(side: int, width: float, height: float) -> int:
    """Visual tokens of one frame on a `side x side` grid after unpad + newlines."""
    r0, r1, c0, c1 = content_box(side, side, width, height)
    return (r1 - r0) * (c1 - c0 + 1)
