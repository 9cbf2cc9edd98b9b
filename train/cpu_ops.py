"""DeepSpeed on a machine without a GPU, with no C++ compiler needed.

On its CPU accelerator, DeepSpeed JIT-compiles a shared-memory all-reduce op (`deepspeed_shm_comm`)
in every fresh environment (30-60 s on 2 cores, and again whenever two environments share torch's
extension cache). The ranks of a CPU run mark it unavailable, so DeepSpeed communicates through
torch.distributed's gloo backend, which needs no build. The one op still built on the CPU, DeepSpeed's
CPU Adam (ZeRO offload configs only), is cached inside the environment (`TORCH_EXTENSIONS_DIR`),
so it is built once per environment.
"""

from __future__ import annotations

import os
import sys

SHM_COMM_OP = "deepspeed_shm_comm"


def rank_environment(env: dict[str, str], gpus: bool) -> dict[str, str]:
    """The environment `longvu train` starts its ranks with: without GPUs, DeepSpeed is told it is on
    the CPU (rather than guessing, and saying so) and builds, if any, go into this environment."""
    env = {**env, "TORCH_EXTENSIONS_DIR": env.get("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))}
    if not gpus:
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def skip_shm_comm_build() -> None:
    """In a CPU rank, before DeepSpeed's communication backend starts: do not build its shm all-reduce."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False  # DeepSpeed keeps this dict; edits persist
