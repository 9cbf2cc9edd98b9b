"""The optimizer a run trains with (`training.optimizer`) and what its states cost.

- `adamw`: torch's AdamW (the Trainer's fused one on a GPU); fp32 moments, 8 bytes a trained parameter.
- `adamw_8bit`: torchao's AdamW8bit: both moments held in 8 bits with one fp32 scale per 256 values
  (~2 bytes a parameter), updated in fp32. Under DeepSpeed ZeRO the optimizer sees ZeRO's flat fp32
  partitions, one tensor per parameter group (ZeRO-1/2) or sub-group (ZeRO-3); torchao keeps a tensor's
  moments in fp32 when it has fewer than 4,096 values or a count not divisible by 256, so after the
  first step `check_low_bit_states` counts what was really quantized and stops the run when more than
  1 % of the trained values fell back (the memory plan counted on 8 bits).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw_8bit")
BLOCK = 256  # values per fp32 scale in torchao's 8-bit states
FALLBACK_LIMIT = 0.01  # of the trained values: more kept in fp32 than this and the run stops


def offloads_optimizer(zero: dict) -> bool:
    """Whether a DeepSpeed `zero_optimization` section puts the optimizer on the CPU (ZeRO-Offload)."""
    return zero.get("offload_optimizer", {}).get("device", "none") not in (None, "none")


def state_bytes_per_param(optimizer: str) -> float:
    """Bytes of optimizer state per trained parameter: the fp32 master copy (kept by DeepSpeed or the
    trainer's fp32 weights) and the two Adam moments."""
    moments = 2 * (1 + 4 / BLOCK) if optimizer == "adamw_8bit" else 2 * 4
    return 4 + moments


def build(optimizer: str, groups: list[dict], betas: tuple[float, float], eps: float):
    """The torchao optimizer for `optimizer` over `groups` (torch param-group dicts with their own lr);
    None for `adamw` (the Trainer's own class is used)."""
    if optimizer == "adamw":
        return None
    if optimizer != "adamw_8bit":
        raise ValueError(f"training.optimizer {optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
    try:
        from torchao.optim import AdamW8bit
    except ImportError as err:
        raise RuntimeError("training.optimizer='adamw_8bit' needs torchao >= 0.17 "
                           "(pip install 'longvu-train[quant]')") from err
    return AdamW8bit(groups, betas=betas, eps=eps, block_size=BLOCK)


def _innermost(optimizer):
    """The optimizer under the Trainer's and DeepSpeed's wrappers (each keeps the one it wraps as `.optimizer`)."""
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def low_bit_counts(optimizer) -> tuple[int, int]:
    """(values whose moments are 8-bit, values whose moments are fp32) over the states the optimizer holds."""
    from torchao.optim.subclass_8bit import OptimState8bit

    quantized = plain = 0
    for state in _innermost(optimizer).state.values():
        moment = state.get("exp_avg")
        if moment is None:
            continue
        if isinstance(moment, OptimState8bit):
            quantized += moment.numel()
        else:
            plain += moment.numel()
    return quantized, plain


def check_low_bit_states(optimizer) -> None:
    """Log how much of the optimizer state is 8-bit; RuntimeError when more than FALLBACK_LIMIT of it is not."""
    import torch

    quantized, plain = low_bit_counts(optimizer)
    total = quantized + plain
    if total == 0:
        return
    shapes = sorted({tuple(s["exp_avg"].shape) for s in _innermost(optimizer).state.values()
                     if "exp_avg" in s and type(s["exp_avg"]) is torch.Tensor})
    logger.info("optimizer adamw_8bit: moments of %d of %d trained values in 8 bits (%d kept in fp32: tensors %s)",
                quantized, total, plain, shapes[:8])
    if plain > FALLBACK_LIMIT * total:
        raise RuntimeError(
            f"training.optimizer='adamw_8bit': the moments of {plain} of {total} trained values stayed in fp32, "
            f"because the tensors the optimizer updates ({shapes[:8]}) have sizes not divisible by {BLOCK}; "
            "with DeepSpeed these are ZeRO's flat partitions (a parameter group's size over the world size). "
            "Use training.optimizer=adamw, or a ZeRO stage/world size whose partitions divide by 256")
