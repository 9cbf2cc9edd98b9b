#!/usr/bin/env python
"""Host-device copy bandwidth as activation offloading (train/activation_offload.py) uses it, from one call.

    python scripts/bench/offload_bandwidth.py [--gib 1] [--copies 6]

Copies `--copies` bf16 tensors of `--gib` GiB each between the GPU and pinned host memory on a side
stream, and prints GB/s: device-to-host and host-to-device alone; device-to-host while the compute
stream runs 8192x3584x18944 bf16 matmuls (an MLP projection of 8K tokens), with the matmuls'
TFLOP/s beside their rate alone; and device-to-host into host buffers taken from PyTorch's caching
host allocator per copy (`torch.empty(pin_memory=True)`) and from the offloader's `HostPool`, each
after a warm-up round.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.activation_offload import HostPool  # noqa: E402


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--copies", type=int, default=6)
    args = parser.parse_args()
    n = int(args.gib * 2**30) // 2
    device = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(args.copies)]
    host = [torch.empty(n, dtype=torch.bfloat16, pin_memory=True) for _ in range(args.copies)]
    side = torch.cuda.Stream()
    total = args.copies * n * 2 / 1e9

    def copies(dst, src):
        def run():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for d, s in zip(dst, src):
                    d.copy_(s, non_blocking=True)
        return run

    timed(copies(host, device))  # warm-up
    d2h = total / timed(copies(host, device))
    h2d = total / timed(copies(device, host))
    a = torch.randn(8192, 3584, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(3584, 18944, device="cuda", dtype=torch.bfloat16)
    flop = 2 * 8192 * 3584 * 18944
    matmuls = 40

    def compute():
        for _ in range(matmuls):
            a @ b

    alone = matmuls * flop / timed(compute) / 1e12
    torch.cuda.synchronize()
    start = time.perf_counter()
    copy_done = torch.cuda.Event()
    copies(host, device)()
    side.record_event(copy_done)
    compute()
    copy_done.synchronize()
    copy_s = time.perf_counter() - start
    torch.cuda.synchronize()
    both_s = time.perf_counter() - start
    overlapped = matmuls * flop / both_s / 1e12

    def cached_copies():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for s in device:
                torch.empty(n, dtype=torch.bfloat16, pin_memory=True).copy_(s, non_blocking=True)

    timed(cached_copies)
    cached = total / timed(cached_copies)
    pool = HostPool(pin=True)

    def pooled_copies():  # as the offloader: take a buffer, copy into it, give it back after
        side.wait_stream(torch.cuda.current_stream())
        taken = []
        with torch.cuda.stream(side):
            for s in device:
                taken.append(pool.take(2 * n))
                taken[-1].view(torch.bfloat16).copy_(s, non_blocking=True)
        for buffer in taken:
            pool.give(buffer)

    timed(pooled_copies)
    pooled = total / timed(pooled_copies)
    print(f"{torch.cuda.get_device_name()}: {args.copies} x {args.gib} GiB bf16, pinned host memory")
    print(f"device->host alone {d2h:.1f} GB/s; host->device alone {h2d:.1f} GB/s")
    print(f"device->host beside matmuls {total / copy_s:.1f} GB/s; matmuls {overlapped:.0f} TFLOP/s beside the copies, "
          f"{alone:.0f} TFLOP/s alone")
    print(f"device->host into caching-allocator buffers {cached:.1f} GB/s; into HostPool buffers (the offloader's) "
          f"{pooled:.1f} GB/s")


if __name__ == "__main__":
    main()
