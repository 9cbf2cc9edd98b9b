"""DeepSpeed on a machine without a GPU, with no C++ compiler needed.

On its CPU accelerator, DeepSpeed JIT-compiles a shared-memory all-reduce op (`deepspeed_shm_comm`)
in every fresh environment (96 s measured on a loaded 2-core machine; again whenever two environments
share torch's extension cache). The ranks of a CPU run mark it unavailable, so DeepSpeed communicates through
torch.distributed's gloo backend, which needs no build. The one op still built on the CPU, DeepSpeed's
CPU Adam (ZeRO offload configs only), is cached inside the environment (`TORCH_EXTENSIONS_DIR`),
so it is built once per environment. The ranks share the cores (OpenMP threads per rank).
"""

from __future__ import annotations

import os
import sys

SHM_COMM_OP = "deepspeed_shm_comm"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def rank_environment(env: dict[str, str], gpus: bool, nproc: int) -> dict[str, str]:
    """The environment `longvu train` starts its `nproc` ranks with. Builds, if any, go into this
    environment. Without GPUs, DeepSpeed is told it is on the CPU (rather than guessing, and saying
    so), and each rank gets its share of the cores as OpenMP threads unless OMP_NUM_THREADS is set:
    ranks that each spin one thread per core slow a shared 2-core machine down ~10x (27 s instead of
    2.6 s per tiny LoRA step, measured)."""
    env = {**env, "TORCH_EXTENSIONS_DIR": env.get("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))}
    if not gpus:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // max(1, nproc))))
    return env


def skip_shm_comm_build() -> None:
    """In a CPU rank, before DeepSpeed's communication backend starts: do not build its shm all-reduce."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False  # DeepSpeed keeps this dict; edits persist
