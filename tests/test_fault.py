"""A rank that dies (SIGKILL) or hangs (SIGSTOP) makes the other rank of a 2-process `shapeflow train`
exit non-zero with a clear message within the collective timeout (engine.timeout_s), not hang; under
DDP, DeepSpeed ZeRO-3 (whose own process groups must inherit the timeout) and FSDP2.

The two processes are started like srun starts them (RANK / WORLD_SIZE / MASTER_ADDR per process, no
torchrun agent that would kill the survivor for us)."""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from multiproc import Ranks
from train_fixtures import FAST, REPO, free_port

pytestmark = pytest.mark.slow
TIMEOUT_S = 30          # engine.timeout_s of the run (start-up of a loaded 2-core machine must fit in it)
BOUND_S = TIMEOUT_S + 30  # the survivor must be gone by then (start-up of the error path included)


def rank_command(rank: int, port: int, shards, run_dir, strategy: list[str]) -> tuple[list[str], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RANK": str(rank), "LOCAL_RANK": str(rank),
           "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "trainer.commands", "train", "vecset_vae_debug", f"data.path={shards}",
           f"run.dir={run_dir}", *FAST, "run.max_steps=100000", "run.ckpt_every=2", "run.eval_every=0",
           "run.log_every=1", f"engine.timeout_s={TIMEOUT_S}", *strategy]
    return cmd, env


STRATEGIES = {"ddp": [], "zero3": ["engine.strategy=deepspeed", "engine.zero_stage=3"],
              "fsdp2": ["engine.strategy=fsdp2"]}


@pytest.mark.parametrize("strategy, fault", [("ddp", "kill"), ("zero3", "hang"), ("fsdp2", "hang")])
def test_dead_or_hung_rank_stops_the_job_in_bounded_time(train_shards, tmp_path, strategy, fault):
    port, run_dir = free_port(), tmp_path / "run"
    cmds, envs = zip(*(rank_command(r, port, train_shards, run_dir, STRATEGIES[strategy]) for r in range(2)))
    with Ranks.popen(cmds, tmp_path / "logs", timeout_s=180 + BOUND_S + 30, envs=envs) as ranks:
        deadline = time.monotonic() + 180
        while not (run_dir / "checkpoints" / "latest").exists():   # both ranks are in the loop
            if not all(code is None for code in ranks.exit_codes()):
                ranks.fail("a rank exited before the first checkpoint")
            if time.monotonic() > deadline:
                ranks.fail("training did not reach its first checkpoint")
            time.sleep(0.5)
        os.kill(ranks[1].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        faulted = time.monotonic()
        # fails with both ranks' output if rank 0 is still running BOUND_S after rank 1 was faulted
        (code, _) = ranks.wait(expect=None, which=[0], timeout_s=BOUND_S)
        err = ranks.output(0, 20000)
        elapsed = time.monotonic() - faulted
        print(f"{fault}: rank 0 exited with {code} after {elapsed:.1f}s")
        assert code == 4, err[-3000:]
        assert "another rank died or stopped responding" in err and f"engine.timeout_s={TIMEOUT_S}" in err, err[-3000:]
