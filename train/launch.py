"""`longvu train CONFIG.yaml [key=value ...]`.

Under a distributed launcher (RANK/LOCAL_RANK set) it trains in this process. Run bare, it starts the
launcher itself: DeepSpeed (default) or torchrun, over the local GPUs, `--nproc N` processes (two on a
machine without GPUs, on the CPU), or the nodes of a DeepSpeed `--hostfile`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys

from train.config import ConfigError, RunConfig
from train.cpu_ops import rank_environment, skip_shm_comm_build
from train.preflight import checked_config


EPILOG = """\
model.init (models are local folders only: nothing is ever downloaded):
  tiny:FAMILY  a random tiny LongVU that trains on a CPU in seconds per step; FAMILY is one of
                 image              576 SVA queries, high-res off (the image stage's shape)
                 video              144 queries, high/low-res mixing (the video stage's and LoRA's shape)
                 video_highres_off  144 queries without the mixing
               It needs no files. Its towers are random unless model.siglip_path/dino_path name tiny tower
               folders (`longvu quickstart` writes them under OUTPUT/towers); export needs those folders.
               configs/lora_tiny.yaml is LoRA at this size, on the CPU.
  qwen2:PATH   a Qwen2 LLM folder, with model.siglip_path and model.dino_path; the connector starts fresh
  longvu:PATH  an original LongVU directory (with model.siglip_path/dino_path) or one of ours
  config:PATH  random weights from a LongVUConfig json (benchmarks, from-scratch runs)
Every problem of the run (types, ranges, missing paths) is printed before any rank starts: one line
each, exit status 2.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a stage from a YAML run config (DeepSpeed ZeRO)",
                                   epilog=EPILOG)
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. training.max_steps=10")
    parser.add_argument("--nproc", type=int, help="processes on this node (default: one per GPU; 2 without GPUs)")
    parser.add_argument("--hostfile", help="DeepSpeed hostfile: train on several nodes (default: none, this node only)")
    parser.add_argument("--launcher", choices=["deepspeed", "torchrun"],
                        help="override launch.launcher (default: the config's, deepspeed unless set)")
    parser.set_defaults(func=run)


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() or 2


def free_port() -> int:
    """A TCP port free on this host now (so concurrent single-node runs never share a rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_command(config: RunConfig, argv: list[str]) -> list[str]:
    """The command that starts every rank, each running `python -m train train ...argv`."""
    launch = config.launch
    nproc = launch.nproc or default_nproc()
    port = launch.master_port or (None if launch.hostfile or launch.master_addr else free_port())
    entry = ["-m", "train", "train", *argv] if launch.launcher == "torchrun" else ["--module", "train", "train", *argv]
    if launch.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        if launch.master_addr:  # several nodes: a rendezvous endpoint, run the same command on each node
            cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={launch.master_addr}:{launch.master_port or 29500}",
                    f"--nnodes={os.environ.get('NNODES', '1')}"]
        elif port:
            cmd += [f"--master-port={port}"]
        return cmd + entry  # `-m train`: torchrun runs the module, not a path relative to the cwd
    deepspeed = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed]
    if launch.hostfile:
        cmd += ["--hostfile", launch.hostfile]
        if launch.master_addr:
            cmd += ["--master_addr", launch.master_addr]
    else:
        cmd += ["--num_gpus", str(nproc)]
    if port:
        cmd += ["--master_port", str(port)]
    return cmd + entry


LOCKED_EXIT = 75  # EX_TEMPFAIL: another run holds the output folder


def run(args: argparse.Namespace) -> int:
    from train.signals import SIGTERM_EXIT, SigtermGuard, StoppedBeforeTraining

    previous = signal.getsignal(signal.SIGTERM)
    SigtermGuard().install()  # first thing: a SIGTERM before launch stops here, explained
    try:
        return _run(args)
    except StoppedBeforeTraining:
        print("longvu train: SIGTERM before the ranks started: stopped, nothing trained "
              f"(exit status {SIGTERM_EXIT})", file=sys.stderr, flush=True)
        return SIGTERM_EXIT
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.nproc is not None:
        overrides.append(f"launch.nproc={args.nproc}")
    if args.hostfile:
        overrides.append(f"launch.hostfile={args.hostfile}")
    if args.launcher:
        overrides.append(f"launch.launcher={args.launcher}")
    try:
        config = checked_config(args.config, overrides)  # every problem, before any rank starts
    except ConfigError as err:
        for line in err.problems:
            print(f"longvu train: {line}", file=sys.stderr)
        return 2
    if under_launcher():
        from train.signals import GUARD

        GUARD.install()  # before torch is imported: a SIGTERM during start-up stops this rank cleanly
        import torch

        from train.checkpoints import CheckpointSaveError
        from train.run import train_in_process
        from train.safe_load import CheckpointError

        if not torch.cuda.is_available():
            skip_shm_comm_build()
        try:
            return train_in_process(config)
        except (CheckpointError, CheckpointSaveError) as err:  # a refused checkpoint, a failed save: one line
            print(f"longvu train: {err}", file=sys.stderr)
            return 2
        except ConfigError as err:  # found only once the model is built (e.g. fused kernels on this device)
            for line in err.problems:
                print(f"longvu train: {line}", file=sys.stderr)
            return 2
    from train.lineage import RunFolderRefused, plan_run
    from train.run_lock import HELD_ENV, RunFolderLocked, RunLock

    try:
        lock = RunLock(config.training.output_dir).acquire()
    except RunFolderLocked as err:
        print(f"longvu train: {err}", file=sys.stderr)
        return LOCKED_EXIT
    try:
        try:
            plan = plan_run(config, apply=True)
        except RunFolderRefused as err:
            print(f"longvu train: {err}", file=sys.stderr)
            return 2
        if plan.finished:
            print(f"longvu train: {plan.resume} is at step {plan.step}, the configured end "
                  "(training.max_steps / num_train_epochs): nothing to train; raise it to train on", flush=True)
            return 0
        return _launch(config, [args.config, *overrides], lock.fd, HELD_ENV)
    finally:
        lock.release()


def _launch(config: RunConfig, argv: list[str], lock_fd: int, held_env: str) -> int:
    """Start the launcher (which inherits the run lock) and wait for it, passing SIGTERM to the ranks."""
    import torch

    from train.signals import SIGTERM_EXIT

    relay = SigtermRelay()
    signal.signal(signal.SIGTERM, relay.request)
    cmd = launcher_command(config, argv)
    print("launching:", " ".join(cmd), flush=True)
    # PYTHONSAFEPATH: the ranks (`python -m train`) must not import from the working directory, where a
    # user's own `data/` folder would shadow this project's `data` package
    env = rank_environment({**os.environ, "PYTHONSAFEPATH": "1", held_env: "1"}, torch.cuda.is_available(),
                           config.launch.nproc or default_nproc())
    launcher = subprocess.Popen(cmd, env=env, pass_fds=(lock_fd,))
    relay.pid = launcher.pid
    while True:
        try:
            code = launcher.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            relay.forward()  # ranks that appeared since the SIGTERM get it too
    if relay.requested and code != 0:
        print(f"longvu train: stopped by SIGTERM (the launcher exited with status {code}); "
              f"exit status {SIGTERM_EXIT}", file=sys.stderr, flush=True)
        return SIGTERM_EXIT
    return code


class SigtermRelay:
    """SIGTERM to `longvu train` once the launcher runs: remembered, and passed to every rank (see
    `preempt_ranks`), including ranks that start after the signal."""

    def __init__(self):
        import psutil  # noqa: F401 (imported now: a signal arriving during its import would break it)

        self.pid: int | None = None
        self.requested = False
        self.signalled: set[int] = set()
        self._forwarding = False

    def request(self, signum, frame) -> None:
        self.requested = True
        if not self._forwarding:  # a second SIGTERM while forwarding the first: the wait loop goes on
            self.forward()

    def forward(self) -> None:
        if self.requested and self.pid is not None:
            self._forwarding = True
            try:
                self.signalled |= preempt_ranks(self.pid, skip=self.signalled)
            finally:
                self._forwarding = False


def preempt_ranks(launcher_pid: int, skip: set[int] = frozenset()) -> set[int]:
    """SIGTERM to `longvu train` (e.g. a container's main process being stopped): pass it to this node's
    training ranks only (the outermost processes with LOCAL_RANK set, not their DataLoader workers),
    which save at the end of the step and exit 0, so the launcher exits 0 (or, still starting up,
    stop at once with status 143). Signalling the launcher instead would kill the ranks after its 30 s
    grace period and exit 1; dying here would leave the ranks training on, unsaved. -> the PIDs signalled."""
    import psutil

    ranks = {}
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:  # the launcher is gone
        return set()
    for proc in children:
        try:
            if "LOCAL_RANK" in proc.environ():
                ranks[proc.pid] = proc
        except psutil.Error:  # gone meanwhile, or not ours to inspect
            continue
    signalled = set()
    for proc in ranks.values():
        try:
            if proc.ppid() not in ranks and proc.pid not in skip:
                proc.send_signal(signal.SIGTERM)
                signalled.add(proc.pid)
        except psutil.Error:
            continue
    return signalled
