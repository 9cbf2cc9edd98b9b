#!/usr/bin/env python
"""Resizing tower token grids (27x27 -> 24x24 of SigLIP/DINO, 12x12 -> 8x8 low-res queries): the two
matmuls of `longvu.token_grid.resize_token_grid` against F.interpolate's bilinear kernel, the way the
towers called it before (a permuted view of the tower's output, CLS token sliced off for DINO), from one call.

    python scripts/bench/token_grid.py [--frames 64] [--repeats 20]

Prints ms per call and the max abs difference of the two results, per shape.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from longvu.token_grid import resize_token_grid

# name: (grid side in, out, channels, leading CLS token: DINO's output is [N, 1 + 729, C] sliced to [:, 1:])
SHAPES = {"siglip 27->24": (27, 24, 1152, False), "dino 27->24": (27, 24, 1536, True),
          "low-res 12->8": (12, 8, 3584, False)}


def interpolated(features: torch.Tensor, side: int) -> torch.Tensor:
    n, tokens, dim = features.shape
    src = int(tokens ** 0.5)
    grid = features.view(n, src, src, dim).permute(0, 3, 1, 2).float()
    out = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    return out.to(features.dtype).permute(0, 2, 3, 1).reshape(n, side * side, dim)


def timed_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=64, help="frames per call (the towers' chunk)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"| grid ({args.frames} frames, bf16) | F.interpolate ms | two matmuls ms | max abs diff |")
    print("|---|---|---|---|")
    for name, (src, side, dim, cls) in SHAPES.items():
        x = torch.randn(args.frames, cls + src * src, dim, device="cuda", dtype=torch.bfloat16)[:, int(cls):]
        old = timed_ms(lambda: interpolated(x, side), args.repeats)
        new = timed_ms(lambda: resize_token_grid(x, side), args.repeats)
        diff = (interpolated(x, side).float() - resize_token_grid(x, side).float()).abs().max().item()
        print(f"| {name}, C={dim} | {old:.2f} | {new:.2f} | {diff:.2e} |")


if __name__ == "__main__":
    main()
