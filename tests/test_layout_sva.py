"""Unpad + newline layout (longvu/layout.py) and the SVA cell geometry (longvu/sva.py) on hand-built
inputs whose expected values follow from the definitions (spec §3.1)."""

from __future__ import annotations

import pytest
import torch

from longvu.layout import content_box, content_mask, tokens_per_frame, unpad_with_newlines
from longvu.sva import MultiTowerCrossAttention, cell_key_mask, split_into_cells

# --- layout -------------------------------------------------------------------------------------


def test_square_frame_keeps_the_whole_grid():
    assert content_box(12, 12, 384, 384) == (0, 12, 0, 12)
    assert tokens_per_frame(12, 384, 384) == 12 * 13 == 156
    assert tokens_per_frame(8, 256, 256) == 8 * 9 == 72
    assert tokens_per_frame(24, 50, 50) == 24 * 25 == 600


def test_spec_table_16_9():
    # spec §3.1 table; sizes are read as (width, height)
    height, width = 720, 1280
    # the original's callers pass (H, W), read as (W, H): 12 rows x 6 columns + 12 newlines
    assert content_box(12, 12, height, width) == (0, 12, 3, 9)
    assert tokens_per_frame(12, height, width) == 84
    # passed correctly: 6 rows x 12 columns + 6 newlines
    assert content_box(12, 12, width, height) == (3, 9, 0, 12)
    assert tokens_per_frame(12, width, height) == 78
    # the low-res grid (8x8) uses the sizes divided by 12 / 8 = 1.5 (int), same aspect ratio
    low_w, low_h = int(width / 1.5), int(height / 1.5)
    assert tokens_per_frame(8, low_h, low_w) == 8 * 4 + 8 == 40
    assert tokens_per_frame(8, low_w, low_h) == 4 * 8 + 4 == 36


def test_odd_difference_keeps_an_extra_row():
    # new_height = int(9 * 12 / 12) = 9; (12 - 9) // 2 = 1 cut from each side -> 10 rows
    assert content_box(12, 12, 12, 9) == (1, 11, 0, 12)
    assert tokens_per_frame(12, 12, 9) == 10 * 13
    # and the same on the column axis (portrait)
    assert content_box(12, 12, 9, 12) == (0, 12, 1, 11)


def test_int_truncation_of_the_kept_extent():
    # int(100 * 12 / 170) = int(7.06) = 7 -> (12 - 7) // 2 = 2 -> rows 2..10 (8 rows)
    assert content_box(12, 12, 170, 100) == (2, 10, 0, 12)
    # int(999 * 12 / 1000) = int(11.988) = 11 -> (12 - 11) // 2 = 0: nothing cut
    assert content_box(12, 12, 1000, 999) == (0, 12, 0, 12)


def test_degenerate_aspect_falls_back_to_the_whole_grid():
    # int(1 * 12 / 1000) = 0 rows kept -> the whole grid is used instead of an empty frame
    assert content_box(12, 12, 1000, 1) == (0, 12, 0, 12)
    assert tokens_per_frame(12, 1000, 1) == 156


def test_content_mask_marks_the_box():
    mask = content_mask(24, 1280, 720)  # int(720 * 24 / 1280) = 13 rows -> (24 - 13) // 2 = 5 cut
    expected = torch.zeros(24, 24, dtype=torch.bool)
    expected[5:19] = True
    assert torch.equal(mask, expected)


def test_unpad_with_newlines_order():
    f, side, c = 2, 4, 3
    grid = torch.tensor(
        [[[[fr, r, col] for col in range(side)] for r in range(side)] for fr in range(f)], dtype=torch.float32
    )
    newline = torch.tensor([-1.0, -1.0, -1.0])
    box = (1, 3, 0, 4)  # rows 1, 2; all columns
    out = unpad_with_newlines(grid, box, newline)
    expected = []
    for fr in range(f):
        rows = []
        for r in (1, 2):
            rows += [[fr, r, col] for col in range(4)] + [[-1, -1, -1]]
        expected.append(rows)
    assert out.tolist() == expected
    # column crop
    out = unpad_with_newlines(grid, (0, 4, 1, 3), newline)
    assert out.shape == (f, 4 * 3, c)
    assert out[0, :3].tolist() == [[0, 0, 1], [0, 0, 2], [-1, -1, -1]]


# --- SVA cells ------------------------------------------------------------------------------------


def _coded_grid(n: int, grid: int) -> torch.Tensor:
    """[n, grid*grid, 3] whose token at (row, col) of item i holds (i, row, col)."""
    return torch.tensor(
        [[[i, r, c] for r in range(grid) for c in range(grid)] for i in range(n)], dtype=torch.float32
    )


def test_split_into_cells_each_cell_holds_its_own_block():
    n, grid, side = 2, 24, 12
    cells = split_into_cells(_coded_grid(n, grid), side)
    assert cells.shape == (n * side * side, 4, 3)
    for i in range(n):
        for qr in range(side):
            for qc in range(side):
                block = cells[i * side * side + qr * side + qc].tolist()
                expected = [[i, 2 * qr + a, 2 * qc + b] for a in range(2) for b in range(2)]
                assert block == expected


def test_split_into_cells_576_queries_one_token_per_cell():
    cells = split_into_cells(_coded_grid(1, 24), 24)
    assert cells.shape == (576, 1, 3)
    assert cells[:, 0].tolist() == [[0, r, c] for r in range(24) for c in range(24)]


def test_cell_key_mask_follows_the_blocks_and_unmasks_fully_padded_cells():
    content = torch.ones(2, 24, 24, dtype=torch.bool)
    content[0, :3] = False  # item 0: rows 0-2 padding
    content[1, :, 23] = False  # item 1: last column padding
    mask = cell_key_mask(content, 12)
    assert mask.shape == (2 * 144, 4)
    for qc in range(12):
        # cell row 0 (rows 0, 1) is all padding -> attends to every key
        assert mask[qc].tolist() == [True] * 4
        # cell row 1 (rows 2, 3): row 2 padding -> [F, F, T, T] in the cell's row-major order
        assert mask[12 + qc].tolist() == [False, False, True, True]
        assert mask[24 + qc].tolist() == [True] * 4
    for qr in range(12):
        assert mask[144 + qr * 12 + 11].tolist() == [True, False, True, False]
        assert mask[144 + qr * 12 + 10].tolist() == [True] * 4


def test_cross_attention_ignores_masked_keys():
    torch.manual_seed(0)
    attn = MultiTowerCrossAttention(16, num_towers=2, num_heads=4).eval()
    m, k = 3, 4
    query = torch.randn(m, 16)
    cells = [torch.randn(m, k, 16), torch.randn(m, k, 16)]
    key_mask = torch.ones(m, 2 * k, dtype=torch.bool)
    key_mask[0, [1, 2, 5]] = False  # cell 0: tower-0 keys 1, 2 and tower-1 key 1 masked
    out = attn(query, cells, key_mask)
    changed = [c.clone() for c in cells]
    # (random perturbations: keys/values start with a LayerNorm, blind to a constant shift)
    changed[0][0, 1:3] += 3 * torch.randn(2, 16)
    changed[1][0, 1] += 3 * torch.randn(16)
    assert torch.allclose(attn(query, changed, key_mask), out, atol=1e-6)
    changed[1][0, 0] += 3 * torch.randn(16)  # an attended key
    assert not torch.allclose(attn(query, changed, key_mask)[0], out[0], atol=1e-3)


@pytest.mark.parametrize("family,cell_tokens", [("video", 4), ("image", None)])
def test_pos_embed_exists_only_with_multi_token_cells(family, cell_tokens):
    from longvu.tiny import tiny_config
    from longvu.sva import VisionSampler

    cfg = tiny_config(family)
    sampler = VisionSampler(8, 2, cfg.cell_side ** 2, 3, 2)
    names = {n for n, _ in sampler.named_parameters() if "pos_embed" in n}
    if cell_tokens is None:
        assert names == set()
    else:
        assert names == {f"layers.{l}.pos_embed_{t}" for l in range(3) for t in range(2)}
        assert sampler.layers[0].pos_embed_0.shape == (cell_tokens, 8)
