"""Stop requests from the job scheduler: SIGTERM (preemption, ``scancel``) and SIGUSR1 (SLURM's warning before the
time limit, ``#SBATCH --signal=USR1@120``).

The handler only records the signal; the training loop asks ``requested()`` after each step, agrees with the other
processes, writes a checkpoint and stops (see ``training.py``). Nothing is interrupted half-way.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopSignals:
    """Context manager: while active, SIGTERM / SIGUSR1 are recorded instead of killing the process.

    Only the main thread can install handlers; elsewhere (a notebook's worker thread) it records nothing."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
