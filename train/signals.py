"""SIGTERM at any moment of a rank's life, without heavy imports (installed before torch loads).

Before training starts (imports, model loading, media probing, DeepSpeed set-up) the handler raises
`StoppedBeforeTraining`: there is nothing to save, so the rank stops at once and exits with
`SIGTERM_EXIT` (128 + 15, the shell's status for SIGTERM) after one log line. Once the training loop
runs it only records the request; `train.trainer.PreemptionCallback` then saves at the end of the
current step and stops (exit 0).
"""

from __future__ import annotations

import signal

SIGTERM_EXIT = 128 + signal.SIGTERM  # 143


class StoppedBeforeTraining(BaseException):
    """SIGTERM arrived before the first training step (a BaseException, like KeyboardInterrupt, so
    that no library's `except Exception` swallows it)."""


class SigtermGuard:
    def __init__(self) -> None:
        self.requested = False
        self.training = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        first = not self.requested
        self.requested = True
        if first and not self.training:  # raised once: a second SIGTERM must not break the clean stop
            raise StoppedBeforeTraining("SIGTERM before the first training step")

    def start_training(self) -> None:
        """From now on a SIGTERM only sets `requested` (saved and stopped at the end of the step)."""
        self.training = True


GUARD = SigtermGuard()  # one per process
