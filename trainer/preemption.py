"""Stop requests from a scheduler: SIGTERM (any scheduler, a plain ``kill``) and SIGUSR1 (SLURM's
warning signal, forwarded by launchers/slurm/train.sbatch) set a flag instead of killing the process.

The loop reads the flag once per optimiser step inside the all-reduce it already does (every rank
agrees on the same step), finishes that step, writes a complete checkpoint on every rank and returns;
``shapeflow train`` then exits with :data:`PREEMPTED_EXIT_CODE`, so a scheduler sees "not done" and a
requeued or restarted job resumes from exactly that step (run.resume=auto).
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

PREEMPTED_EXIT_CODE = 75   # EX_TEMPFAIL: stopped on request after a checkpoint; run again to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Catches the stop signals while active (a context manager); ``signal_name`` once one arrived."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():   # handlers only install there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
