"""Stop requests from the job scheduler: SIGTERM (preemption, ``scancel``) and SIGUSR1 (SLURM's warning before the
time limit, ``#SBATCH --signal=USR1@120``).

The handler only records the signal; the training loop asks ``requested()`` after each step, agrees with the other
processes, writes a checkpoint and stops (see ``training.py``). Nothing is interrupted half-way. SLURM signals every
process of a job step, the DataLoader's workers too: `spare_worker` (their ``worker_init_fn``) leaves the signals to
the main process.
"""

from __future__ import annotations

import os
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


def spare_worker(worker_id: int, main_process: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: this worker survives the scheduler's SIGTERM / SIGUSR1, which are for the main
    process (a worker they ended would crash the run before its checkpoint: ``DataLoader worker ... is killed by
    signal``). A SIGTERM from the main process itself (how torch ends a worker that does not stop when asked) still
    ends it, as torch's own worker handler does. Bind ``main_process`` to the pid of the process that iterates the
    loader (``functools.partial(spare_worker, main_process=os.getpid())``): under the ``forkserver`` or ``spawn``
    start methods a worker's parent is not that process. Needs ``sigwaitinfo`` (Linux); elsewhere nothing changes."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    senders = {os.getppid()} | ({main_process} if main_process is not None else set())
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the thread below, started after, inherits the mask
    threading.Thread(target=_take_stop_signals, args=(senders,), name="glip-spare-worker", daemon=True).start()


def _take_stop_signals(senders: set[int]) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)  # blocked in every thread, so taken here, with its sender
        if info.si_signo == signal.SIGTERM and info.si_pid in senders:
            os._exit(0)
