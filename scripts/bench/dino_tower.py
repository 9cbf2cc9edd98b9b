#!/usr/bin/env python
"""DINOv2-giant (LongVU's DINO tower, 378 px) on many frames: seconds, TFLOP/s and output agreement of
the ways `longvu.towers.DinoTower` can run, from one call.

    python scripts/bench/dino_tower.py [--frames 1024] [--variants eager compile regional fp8] [--variant-limit-s 150]

Random weights at the released shapes, bf16 pixels already on the GPU (decode and preprocessing are
not in the clock: this isolates the tower, which is most of a 1-hour video's time to first token).
Variants (each on a freshly built tower with the same weights):
- `eager`: `DinoTower` as it runs without options, 64-frame chunks;
- `compile`: `DinoTower.compile()` (one static 64-frame graph);
- `compile-128`: the same with 128-frame chunks;
- `cudnn`: `compile` with PyTorch's cuDNN attention backend as the only one (FlashAttention-2,
  memory-efficient and math off; inductor's graph cache off, so the graph is compiled for it);
- `autotune`: `compile(mode="max-autotune-no-cudagraphs")` (Triton GEMM templates tuned per shape);
- `regional`: each of the 40 encoder layers under `torch.compile` instead of the whole tower (one
  graph serves every layer, so it compiles once: on the CPU, an 8-layer tiny DINOv2 compiled in 5.1 s
  this way against 14.4 s whole; not yet compared on a GPU);
- `fp8-eager`: `DinoTower.quantize_fp8()` (`longvu.fp8`: e4m3 `torch._scaled_mm`, per-row weight and
  per-token activation scales), not compiled;
- `fp8`: the same + `compile`;
- `fp8-tensor`: `fp8` with one scale per weight and one per activation tensor (`per_row=False`);
- `fp8-regional`: `fp8` with the per-layer compile of `regional`.
A variant still compiling or running after `--variant-limit-s` is reported as timed out and the next
one starts. Per variant: compile/warm-up seconds, seconds for `--frames` frames, the same scaled to 3,600 frames
(one hour at 1 fps), TFLOP/s (matmul + attention FLOPs of the forward), and against `eager`: the max
abs difference and the mean cosine similarity of the patch features. `--profile`: per variant, the
GPU kernels that take most of one chunk's time (torch.profiler).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from longvu.towers import DinoTower  # noqa: E402
from transformers import Dinov2Config  # noqa: E402
from vision_pipeline import DINOV2_GIANT  # noqa: E402

VARIANTS = ("eager", "compile", "compile-128", "cudnn", "autotune", "regional", "fp8-eager", "fp8", "fp8-tensor", "fp8-regional")
SIZE = 378


def forward_flops(config: Dinov2Config, frames: int) -> float:
    """Matmul + attention FLOPs of DINOv2's forward on `frames` SIZE-px frames (norms etc. left out)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    tokens = (SIZE // config.patch_size) ** 2 + 1
    mlp_hidden = (int(d * config.mlp_ratio * 2 / 3) + 7) // 8 * 8 if config.use_swiglu_ffn else d * config.mlp_ratio
    mlp = 3 * d * mlp_hidden if config.use_swiglu_ffn else 2 * d * mlp_hidden
    per_token = 2 * (4 * d * d + mlp)  # qkv + out projections, the MLP
    attention = 4 * tokens * tokens * d  # QK^T and PV
    return frames * layers * (tokens * per_token + attention)


def build(config: Dinov2Config, dtype) -> DinoTower:
    torch.manual_seed(0)
    with torch.device("cuda"):
        return DinoTower(config).to(dtype).eval()


def prepare(variant: str, tower: DinoTower) -> None:
    if variant.startswith("fp8"):
        tower.quantize_fp8(per_row=variant != "fp8-tensor")
    if variant == "compile-128":
        tower.chunk_size = 128
    if variant == "autotune":
        tower.compile(mode="max-autotune-no-cudagraphs")
    elif variant.endswith("regional"):
        for layer in tower.vision_tower.encoder.layer:
            layer.compile(dynamic=False)
    elif variant not in ("eager", "fp8-eager"):
        tower.compile()


def _time_out(signum, frame):
    raise TimeoutError("past --variant-limit-s")


def run(tower: DinoTower, pixels: torch.Tensor) -> tuple[torch.Tensor, float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = tower(pixels)
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def print_profile(variant: str, tower: DinoTower, chunk: torch.Tensor, top: int = 10) -> None:
    """The `top` GPU kernels by total time over one chunk through `tower`, with their share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(tower, chunk)
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    print(f"  {variant}: {total / 1e3:.1f} ms of GPU kernels for {chunk.shape[0]} frames")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        print(f"    {100 * e.device_time_total / total:5.1f}% {e.device_time_total / 1e3:8.2f} ms x{e.count:<4} {e.key[:110]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        default=["eager", "compile", "fp8-eager", "fp8", "fp8-regional", "regional"])
    parser.add_argument("--profile", action="store_true", help="print each variant's top GPU kernels on one chunk")
    parser.add_argument("--variant-limit-s", type=int, default=150, help="seconds one variant may take")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGALRM, _time_out)
    dtype = torch.bfloat16
    config = Dinov2Config(**DINOV2_GIANT)
    g = torch.Generator(device="cuda").manual_seed(1)
    pixels = torch.randn(args.frames, 3, SIZE, SIZE, device="cuda", generator=g, dtype=dtype)
    pixels = F.avg_pool2d(pixels, 3, 1, 1)  # some spatial correlation, like an image
    flops = forward_flops(config, args.frames)
    reference = None
    print(f"DINOv2-giant {SIZE} px, {args.frames} frames, bf16, {torch.cuda.get_device_name()}, "
          f"{flops / 1e15:.2f} PFLOP per pass", flush=True)
    print("| variant | warm-up s | seconds | s per 3600 frames | TFLOP/s | max abs diff | cosine |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for variant in args.variants:
        torch._dynamo.reset()
        # cudnn: no other fused attention kernel, and no graph from the cache compiled for FlashAttention
        torch.backends.cuda.enable_flash_sdp(variant != "cudnn")
        torch.backends.cuda.enable_mem_efficient_sdp(variant != "cudnn")
        torch.backends.cuda.enable_math_sdp(variant != "cudnn")
        torch._inductor.config.fx_graph_cache = variant != "cudnn"
        signal.alarm(args.variant_limit_s)
        try:
            tower = build(config, dtype)
            start = time.perf_counter()
            prepare(variant, tower)
            run(tower, pixels[: tower.chunk_size])
            warm = time.perf_counter() - start
            out, seconds = run(tower, pixels)
        except Exception as err:  # an optional path (FP8 units, cuDNN attention) that does not run here, or too slow
            print(f"| {variant} | unavailable: {type(err).__name__}: {str(err)[:200]} |||||", flush=True)
            continue
        finally:
            signal.alarm(0)
        if reference is None:
            reference = out.float()
        diff = (out.float() - reference).abs().max().item()
        cosine = F.cosine_similarity(out.float(), reference, dim=-1).mean().item()
        print(f"| {variant} | {warm:.1f} | {seconds:.2f} | {seconds * 3600 / args.frames:.2f} | "
              f"{flops / seconds / 1e12:.0f} | {diff:.3g} | {cosine:.5f} |", flush=True)
        if args.profile:
            print_profile(variant, tower, pixels[: tower.chunk_size])
        del tower, out
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
