"""Run :func:`process_mesh` over many meshes in worker processes with a per-mesh time limit.

A plain multiprocessing.Pool cannot stop one task that hangs inside C++ code; here every worker has
its own pipe, the parent knows when each task started, and a worker that runs past the limit (or
dies, e.g. killed for memory) is killed and replaced while the other workers carry on.

Outcomes are handed on in input order, whatever order the workers finish in: the same inputs give
shards with the same samples in the same order for any worker count, so a training run on them is
reproducible. Outcomes that finish early wait in a bounded buffer (REORDER_AHEAD per worker); while
it is full, idle workers wait for the oldest task instead of starting new ones.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Callable, Iterable

from data_pipeline.preprocess import render
from data_pipeline.preprocess.config import PreprocessConfig
from data_pipeline.preprocess.mesh_io import MeshError
from data_pipeline.preprocess.pipeline import MeshTask, process_mesh
from data_pipeline.preprocess.watertight import WatertightError


@dataclass
class Outcome:
    task: MeshTask
    sample: dict | None     # None when the mesh failed
    reason: str = ""        # why it failed


def _worker(conn, cfg: PreprocessConfig, threads: int) -> None:
    # libigl sizes its thread pool from IGL_NUM_THREADS on first use: N workers share the cores.
    os.environ.setdefault("IGL_NUM_THREADS", str(threads))
    os.environ.setdefault("LP_NUM_THREADS", str(threads))   # Mesa llvmpipe (condition views), same share
    while True:
        task = conn.recv()
        if task is None:
            return
        try:
            conn.send(Outcome(task, process_mesh(task, cfg)))
        except (MeshError, WatertightError) as err:
            conn.send(Outcome(task, None, str(err)))
        except MemoryError:
            conn.send(Outcome(task, None, "out of memory"))
        except Exception as err:  # any other library error on a strange input: skip the mesh, keep going
            conn.send(Outcome(task, None, f"{type(err).__name__}: {err}"[:500]))


class _Slot:
    def __init__(self, ctx, cfg: PreprocessConfig, threads: int) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, cfg, threads), daemon=True)
        self.process.start()
        child.close()
        self.task: MeshTask | None = None
        self.index = -1          # the task's position in the input
        self.started = 0.0

    def give(self, index: int, task: MeshTask) -> None:
        self.index, self.task, self.started = index, task, time.monotonic()
        self.conn.send(task)

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


REORDER_AHEAD = 4   # outcomes per worker that may wait for an older, slower task


class _InputOrder:
    """Passes outcomes to ``on_outcome`` in input order; the ones that arrive early wait here."""

    def __init__(self, on_outcome: Callable[[Outcome], None], limit: int) -> None:
        self.on_outcome, self.limit = on_outcome, limit
        self.waiting: dict[int, Outcome] = {}
        self.next = 0

    def add(self, index: int, outcome: Outcome) -> None:
        self.waiting[index] = outcome
        while self.next in self.waiting:
            self.on_outcome(self.waiting.pop(self.next))
            self.next += 1

    def has_room(self) -> bool:
        return len(self.waiting) < self.limit


def run_pool(tasks: Iterable[MeshTask], cfg: PreprocessConfig, workers: int,
             on_outcome: Callable[[Outcome], None]) -> None:
    """Process every task; ``on_outcome`` is called in this process, in input order."""
    ctx = mp.get_context(_start_method())
    threads = max(1, (os.cpu_count() or 1) // workers)
    pending = list(enumerate(tasks))[::-1]    # pop() from the end keeps the input order
    slots = [_Slot(ctx, cfg, threads) for _ in range(max(1, min(workers, len(pending))))] if pending else []
    ordered = _InputOrder(on_outcome, REORDER_AHEAD * max(1, len(slots)))

    def feed_idle_slots() -> None:
        for slot in slots:
            if slot.task is None and pending and ordered.has_room():
                slot.give(*pending.pop())

    try:
        feed_idle_slots()
        while any(slot.task is not None for slot in slots):
            busy = {slot.conn: slot for slot in slots if slot.task is not None}
            for conn in wait(list(busy), timeout=_time_to_deadline(busy.values(), cfg.mesh_timeout_s)):
                slot = busy[conn]
                try:
                    outcome = conn.recv()
                except (EOFError, OSError):
                    code = slot.process.exitcode
                    outcome = Outcome(slot.task, None, f"worker process died (exit code {code}; out of memory?)")
                    slots[slots.index(slot)] = _replace(slot, ctx, cfg, threads)
                slot.task = None
                ordered.add(slot.index, outcome)
            for position, slot in enumerate(slots):
                if slot.task is not None and time.monotonic() - slot.started > cfg.mesh_timeout_s:
                    slots[position] = _replace(slot, ctx, cfg, threads)
                    ordered.add(slot.index, Outcome(slot.task, None, f"timeout: still running after "
                                                                     f"{cfg.mesh_timeout_s:g} s (mesh_timeout_s)"))
            feed_idle_slots()
    finally:
        for slot in slots:
            slot.stop()


def _start_method() -> str:
    """fork, unless this process has made an OpenGL context (it rendered condition views itself):
    Mesa's state does not survive a fork and a forked worker's own context then hangs, so spawn."""
    if render.context_made() or "fork" not in mp.get_all_start_methods():
        return "spawn"
    return "fork"


def _replace(slot: _Slot, ctx, cfg: PreprocessConfig, threads: int) -> _Slot:
    slot.kill()
    return _Slot(ctx, cfg, threads)


def _time_to_deadline(slots, limit: float) -> float:
    now = time.monotonic()
    return max(0.01, min(limit - (now - slot.started) for slot in slots) + 0.01)
