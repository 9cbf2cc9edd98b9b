"""Token-grid resizing (longvu.token_grid) against F.interpolate's bilinear resize, the reference's op."""

from __future__ import annotations

import pytest
import torch

from longvu.token_grid import resize_token_grid
from scripts.bench.token_grid import interpolated  # the towers' former F.interpolate resize


@pytest.mark.parametrize("src, side", [(27, 24), (24, 8), (12, 8), (5, 9), (2, 1)])
def test_resize_equals_bilinear_interpolation(src, side):
    features = torch.randn(3, src * src, 7, generator=torch.Generator().manual_seed(src * 31 + side))
    got = resize_token_grid(features, side)
    assert got.shape == (3, side * side, 7)
    torch.testing.assert_close(got, interpolated(features, side), rtol=1e-6, atol=1e-6)


def test_resize_keeps_the_dtype_and_returns_a_same_size_grid_unchanged():
    features = torch.randn(2, 729, 4).to(torch.bfloat16)
    got = resize_token_grid(features, 24)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, interpolated(features, 24))  # bf16 tolerances: one rounding apart
    assert resize_token_grid(features, 27) is features


def test_a_grid_that_is_not_square_is_refused():
    with pytest.raises(ValueError, match="730 tokens, not a square grid"):
        resize_token_grid(torch.zeros(1, 730, 4), 24)
