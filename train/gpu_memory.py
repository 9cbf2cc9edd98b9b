"""`training.gpu_memory_gib`: cap this process's CUDA memory so a run behaves as on a smaller card.

The cap is the CUDA caching allocator's per-process limit (`torch.cuda.set_per_process_memory_fraction`):
reserving more than it frees the allocator's cache and then raises out-of-memory, as a card of that
size would. The `auto` activation-checkpointing plan sizes itself to the capped memory
(`train.activation_checkpointing.plan_for_run`).
"""

from __future__ import annotations

import torch

from train.config import ConfigError

GIB = 2**30


def capped_bytes(total_bytes: int, cap_gib: float | None) -> int:
    """The memory a run may use: the device's `total_bytes`, or `cap_gib` when set (ConfigError if above it)."""
    if cap_gib is None:
        return total_bytes
    if cap_gib * GIB > total_bytes:
        raise ConfigError(f"training.gpu_memory_gib={cap_gib} is more than this GPU's {total_bytes / GIB:.1f} GiB")
    return int(cap_gib * GIB)


def device_bytes(device: torch.device, cap_gib: float | None) -> int:
    """`capped_bytes` of a CUDA device."""
    return capped_bytes(torch.cuda.get_device_properties(device).total_memory, cap_gib)


def cap_gpu_memory(device: torch.device, cap_gib: float | None) -> None:
    """Limit the caching allocator on `device` to `cap_gib` (no-op when None)."""
    if cap_gib is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(capped_bytes(total, cap_gib) / total, device)
