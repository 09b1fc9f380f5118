"""Progress of long loops over items (meshes, batches): a tqdm bar on a terminal, plain lines elsewhere.

A bar's carriage-return updates turn a SLURM job log or any redirected stderr into one endless line of
fragments (tqdm refreshes ten times a second). Off a terminal, :class:`PlainProgress` prints one line at
most every ``interval`` seconds and one at the end, e.g.::

    preprocess job 0/4: 1200/50000 mesh (2.4%) failed=3, 1.9 mesh/s, ETA 7:08:10
"""
from __future__ import annotations

import datetime
import sys
import time
from typing import TextIO

PLAIN_INTERVAL = 30.0     # seconds between plain lines


class PlainProgress:
    """The tqdm calls the loops use (update, set_postfix, close), printed as plain lines."""

    def __init__(self, total: int, desc: str, unit: str, stream: TextIO, interval: float = PLAIN_INTERVAL):
        self.total, self.desc, self.unit, self.stream, self.interval = total, desc, unit, stream, interval
        self.count, self.postfix = 0, ""
        self.started = self.last = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if not self.closed and self.count:
            self._print(time.perf_counter())
        self.closed = True

    def line(self, now: float) -> str:
        rate = self.count / max(now - self.started, 1e-9)
        done = f"{self.count}/{self.total} {self.unit}" if self.total else f"{self.count} {self.unit}"
        share = f" ({100 * self.count / self.total:.1f}%)" if self.total else ""
        eta = ""
        if self.total and rate > 0:
            eta = f", ETA {datetime.timedelta(seconds=round((self.total - self.count) / rate))}"
        postfix = f" {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done}{share}{postfix}, {rate:.3g} {self.unit}/s{eta}"

    def _print(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)


def progress(total: int, desc: str, unit: str, enabled: bool = True, stream: TextIO | None = None):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a :class:`PlainProgress`;
    nothing is printed when not ``enabled``."""
    from tqdm import tqdm

    stream = stream if stream is not None else sys.stderr
    if enabled and not stream.isatty():
        return PlainProgress(total, desc, unit, stream)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=stream)
