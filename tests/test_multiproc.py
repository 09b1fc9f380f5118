"""tests/multiproc.py: a hung rank fails the test within its bound, with every rank's exit code and output."""
from __future__ import annotations

import os
import sys
import threading
import time

import pytest
from multiproc import RankFailure, run_commands, spawn_ranks

BOUND_S = 20


def hang_on_rank_1(rank: int, marker: str) -> None:
    print(f"{marker}: rank {rank} started", flush=True)
    if rank == 1:
        print(f"{marker}: rank 1 waits for a peer that never comes", flush=True)
        threading.Event().wait()   # as a rank stuck in a collective its peer never joins
    print(f"{marker}: rank {rank} done", flush=True)


def abort_on_rank_0(rank: int) -> None:
    if rank == 0:
        print("rank 0 aborts", flush=True)
        os.abort()   # SIGABRT, as "terminate called without an active exception" ends a rank


def test_a_hung_rank_fails_within_the_bound_with_every_ranks_output(tmp_path):
    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        spawn_ranks(hang_on_rank_1, ("hung-rank-test",), nprocs=2, log_dir=tmp_path, timeout_s=BOUND_S)
    elapsed = time.monotonic() - started
    message = str(failure.value)
    print(message)
    assert elapsed < BOUND_S + 15, f"took {elapsed:.1f}s for a {BOUND_S}s bound"
    assert "rank 1 still running after the bound" in message
    assert "rank 0 (pid" in message and "exit code 0" in message            # the finished rank, too
    assert "hung-rank-test: rank 0 done" in message
    assert "hung-rank-test: rank 1 waits for a peer that never comes" in message
    assert "hang_on_rank_1" in message        # rank 1's Python stack (faulthandler) before the kill
    assert "exit code -9 (SIGKILL)" in message


def test_a_crashed_rank_is_reported_with_its_signal(tmp_path):
    with pytest.raises(RankFailure) as failure:
        spawn_ranks(abort_on_rank_0, nprocs=2, log_dir=tmp_path, timeout_s=BOUND_S)
    message = str(failure.value)
    assert "rank 0 exited with -6 (SIGABRT) (expected 0)" in message and "rank 0 aborts" in message


def test_commands_are_bounded_too(tmp_path):
    hang = [sys.executable, "-c", "import time; print('command hangs', flush=True); time.sleep(600)"]
    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        run_commands([hang, [sys.executable, "-c", "print('command ok')"]], log_dir=tmp_path, timeout_s=5)
    assert time.monotonic() - started < 5 + 15
    message = str(failure.value)
    assert "rank 0 still running after the bound" in message and "command hangs" in message
    assert "command ok" in message
