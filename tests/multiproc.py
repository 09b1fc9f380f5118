"""Start the processes of a multi-process test with a bounded wait, and fail with every rank's output.

Every multi-process test goes through this module (tests/test_train_ddp.py, test_strategies.py,
test_loader_distributed.py, test_fault.py; test_slurm.py uses :func:`tail` for its job logs):

* :func:`spawn_ranks` runs ``fn(rank, *args)`` in ``nprocs`` spawned processes;
* :func:`run_commands` runs command lines (a launcher such as torchrun, or one command per rank);
* :class:`Ranks` is the group of started processes for tests that act on them while they run
  (tests/test_fault.py kills or stops one).

Each process writes stdout and stderr to its own file (``rank<i>.log`` in ``log_dir``), so C++ output
such as ``terminate called without an active exception`` is kept too. The wait is bounded: when the
deadline passes, or a process fails and the others do not follow within ``grace_s``, every process
still running is asked for its Python stacks (spawned ranks: SIGUSR1 -> faulthandler), then killed
with its whole process group (DataLoader workers, torchrun's children), and the test fails with an
AssertionError that names each process's exit code (negative: killed by that signal) and the tail of
its output. No multi-process test waits for pytest-timeout.
"""
from __future__ import annotations

import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

TAIL_CHARS = 3000
GRACE_S = 20.0   # after one process failed, how long the others get to finish before they are killed


class RankFailure(AssertionError):
    """A process group did not finish in time, or a process exited with an unexpected code."""


def tail(path: Path, chars: int = TAIL_CHARS) -> str:
    """The last ``chars`` characters of a file (an empty string when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _signal_name(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    return str(code)


def _spawned_main(fn: Callable, rank: int, args: tuple, log: str) -> None:
    """Entry of a spawned rank: own session (so its workers can be killed with it), output to its log."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    faulthandler.enable()                                     # fatal signals (SIGABRT, SIGSEGV): stacks
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # on timeout: where each thread waits
    fn(rank, *args)   # an exception: multiprocessing prints its traceback (to the log) and exits with 1


class _Proc:
    """One started process: a multiprocessing.Process or a subprocess.Popen, behind one interface."""

    def __init__(self, name: str, log: Path, process: Any):
        self.name, self.log, self.process = name, log, process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def sentinel(self):
        return self.process.sentinel if isinstance(self.process, multiprocessing.process.BaseProcess) else None

    def poll(self) -> int | None:
        if isinstance(self.process, subprocess.Popen):
            return self.process.poll()
        return self.process.exitcode

    def signal_group(self, sig: int) -> None:
        """``sig`` to the process's whole process group (it leads its own session)."""
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def reap(self, timeout: float) -> None:
        if isinstance(self.process, subprocess.Popen):
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        else:
            self.process.join(timeout)


class Ranks:
    """Started processes (one per rank, or one launcher); use :meth:`wait` or as a context manager."""

    def __init__(self, procs: list[_Proc], timeout_s: float, what: str):
        self.procs, self.timeout_s, self.what = procs, timeout_s, what
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s

    # -- starting -------------------------------------------------------------
    @classmethod
    def spawn(cls, fn: Callable, args: tuple, nprocs: int, log_dir: Path, timeout_s: float) -> "Ranks":
        """``fn(rank, *args)`` in ``nprocs`` processes started with the spawn method."""
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        ctx = multiprocessing.get_context("spawn")
        procs = []
        for rank in range(nprocs):
            log = log_dir / f"rank{rank}.log"
            log.write_text("")
            p = ctx.Process(target=_spawned_main, args=(fn, rank, args, str(log)), name=f"rank{rank}")
            p.start()
            procs.append(_Proc(f"rank {rank}", log, p))
        return cls(procs, timeout_s, f"{getattr(fn, '__name__', fn)} x{nprocs}")

    @classmethod
    def popen(cls, cmds: Sequence[Sequence[str]], log_dir: Path, timeout_s: float,
              envs: Sequence[dict | None] | None = None, cwd: Path | None = None,
              names: Sequence[str] | None = None) -> "Ranks":
        """One process per command line, each in its own session, output to ``log_dir/rank<i>.log``."""
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        envs = list(envs) if envs is not None else [None] * len(cmds)
        names = list(names) if names is not None else [f"rank {i}" if len(cmds) > 1 else "launcher"
                                                      for i in range(len(cmds))]
        procs = []
        for i, cmd in enumerate(cmds):
            log = log_dir / f"rank{i}.log"
            env = dict(envs[i] if envs[i] is not None else os.environ)
            env.setdefault("PYTHONFAULTHANDLER", "1")   # a fatal signal prints the Python stacks
            env.setdefault("PYTHONUNBUFFERED", "1")     # the tail is current when the process is killed
            with open(log, "wb") as out:
                p = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=cwd, start_new_session=True)
            procs.append(_Proc(names[i], log, p))
        return cls(procs, timeout_s, " | ".join(" ".join(map(str, c))[:200] for c in cmds))

    # -- state ------------------------------------------------------------------
    def __getitem__(self, i: int) -> _Proc:
        return self.procs[i]

    def exit_codes(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def output(self, i: int, chars: int = TAIL_CHARS) -> str:
        return tail(self.procs[i].log, chars)

    def report(self, headline: str, chars: int = TAIL_CHARS) -> str:
        lines = [f"{headline} [{self.what}; bound {self.timeout_s:.0f}s, "
                 f"{time.monotonic() - self.started:.1f}s elapsed]"]
        for p in self.procs:
            lines.append(f"---- {p.name} (pid {p.pid}) exit code {_signal_name(p.poll())}, "
                         f"last output ({p.log}):")
            lines.append(tail(p.log, chars).rstrip() or "(no output)")
        return "\n".join(lines)

    def fail(self, headline: str) -> None:
        """Kill what is still running and raise with every process's exit code and output."""
        self.kill()
        raise RankFailure(self.report(headline))

    # -- waiting ----------------------------------------------------------------
    def _wait_any(self, timeout: float) -> None:
        sentinels = [p.sentinel for p in self.procs if p.sentinel is not None and p.poll() is None]
        if sentinels and len(sentinels) == sum(p.poll() is None for p in self.procs):
            multiprocessing.connection.wait(sentinels, timeout=max(0.0, timeout))
        else:
            time.sleep(max(0.0, min(timeout, 0.2)))

    def wait(self, expect: int | Sequence[int] | None = 0, grace_s: float = GRACE_S,
             which: Sequence[int] | None = None, timeout_s: float | None = None) -> list[int | None]:
        """Wait for the processes ``which`` (default: all) within the bound; return every exit code.

        ``timeout_s`` (from now) or the group's deadline, whichever is first. When one of them exits
        with a code other than 0 the others get ``grace_s`` more. Fails (after killing everything
        still running) on timeout, or when an exit code differs from ``expect`` (an int for all, a list
        per process; None: accept any)."""
        which = list(range(len(self.procs))) if which is None else list(which)
        deadline = self.deadline if timeout_s is None else min(self.deadline, time.monotonic() + timeout_s)
        while True:
            codes = self.exit_codes()
            pending = [i for i in which if codes[i] is None]
            if not pending:
                break
            if any(codes[i] not in (None, 0) for i in which):
                deadline = min(deadline, time.monotonic() + grace_s)
                grace_s = float("inf")   # start the grace period once
            now = time.monotonic()
            if now >= deadline:
                self._dump_stacks([self.procs[i] for i in pending])
                names = ", ".join(self.procs[i].name for i in pending)
                self.fail(f"{names} still running after the bound: killed")
            self._wait_any(min(deadline - now, 1.0))
        for i in which:
            self.procs[i].reap(5)
        codes = self.exit_codes()
        if expect is not None:
            want = [expect] * len(self.procs) if isinstance(expect, int) else list(expect)
            bad = [i for i in which if codes[i] != want[i]]
            if bad:
                self.fail("unexpected exit code: " + ", ".join(
                    f"{self.procs[i].name} exited with {_signal_name(codes[i])} (expected {want[i]})"
                    for i in bad))
        return codes

    def _dump_stacks(self, procs: list[_Proc]) -> None:
        """Ask still-running spawned ranks for their Python stacks (they registered SIGUSR1)."""
        spawned = [p for p in procs if p.sentinel is not None]
        for p in spawned:
            try:
                os.kill(p.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        if spawned:
            time.sleep(1.0)

    def kill(self) -> None:
        """SIGKILL every process group still running (stopped processes included) and reap them."""
        for p in self.procs:
            if p.poll() is None:
                p.signal_group(signal.SIGKILL)
        for p in self.procs:
            p.reap(10)

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def spawn_ranks(fn: Callable, args: tuple = (), *, nprocs: int, log_dir: Path, timeout_s: float,
                expect: int | Sequence[int] | None = 0, grace_s: float = GRACE_S) -> list[int | None]:
    """Run ``fn(rank, *args)`` on ``nprocs`` spawned ranks; fail with their output unless all exit ``expect``.

    ``fn`` must be importable by the children (a module-level function of a test module)."""
    with Ranks.spawn(fn, args, nprocs, log_dir, timeout_s) as ranks:
        return ranks.wait(expect, grace_s)


def run_commands(cmds: Sequence[Sequence[str]], *, log_dir: Path, timeout_s: float,
                 envs: Sequence[dict | None] | None = None, cwd: Path | None = None,
                 expect: int | Sequence[int] | None = 0, grace_s: float = GRACE_S) -> Ranks:
    """Run the command lines concurrently (bounded); returns the finished group (for its output)."""
    with Ranks.popen(cmds, log_dir, timeout_s, envs=envs, cwd=cwd) as ranks:
        ranks.wait(expect, grace_s)
        return ranks
