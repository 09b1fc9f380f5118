"""A rank that dies (SIGKILL) or hangs (SIGSTOP) makes the other rank of a 2-process `shapeflow train`
exit non-zero with a clear message within the collective timeout (engine.timeout_s), not hang; under
DDP, DeepSpeed ZeRO-3 (whose own process groups must inherit the timeout) and FSDP2.

The two processes are started like srun starts them (RANK / WORLD_SIZE / MASTER_ADDR per process, no
torchrun agent that would kill the survivor for us)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from train_fixtures import FAST, REPO, free_port, train_shards  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
TIMEOUT_S = 15          # engine.timeout_s of the run
BOUND_S = TIMEOUT_S + 30  # the survivor must be gone by then (start-up of the error path included)


def start_rank(rank: int, port: int, shards, run_dir, strategy: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RANK": str(rank), "LOCAL_RANK": str(rank),
           "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "trainer.commands", "train", "vecset_vae_debug", f"data.path={shards}",
           f"run.dir={run_dir}", *FAST, "run.max_steps=100000", "run.ckpt_every=2", "run.eval_every=0",
           "run.log_every=1", f"engine.timeout_s={TIMEOUT_S}", *strategy]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


STRATEGIES = {"ddp": [], "zero3": ["engine.strategy=deepspeed", "engine.zero_stage=3"],
              "fsdp2": ["engine.strategy=fsdp2"]}


@pytest.mark.parametrize("strategy, fault", [("ddp", "kill"), ("zero3", "hang"), ("fsdp2", "hang")])
def test_dead_or_hung_rank_stops_the_job_in_bounded_time(train_shards, tmp_path, strategy, fault):
    port, run_dir = free_port(), tmp_path / "run"
    procs = [start_rank(r, port, train_shards, run_dir, STRATEGIES[strategy]) for r in range(2)]
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "checkpoints" / "latest").exists():   # both ranks are in the loop
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
            assert time.monotonic() < deadline, "training did not reach its first checkpoint"
            time.sleep(0.5)
        os.kill(procs[1].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        faulted = time.monotonic()
        try:
            _, err = procs[0].communicate(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {BOUND_S}s after rank 1 was {fault}ed")
        elapsed = time.monotonic() - faulted
        print(f"{fault}: rank 0 exited with {procs[0].returncode} after {elapsed:.1f}s")
        assert procs[0].returncode == 4, err[-3000:]
        assert "another rank died or stopped responding" in err and "engine.timeout_s=15" in err, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait()
