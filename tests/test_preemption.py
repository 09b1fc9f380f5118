"""Preemption and crashes on 2 torchrun processes (gloo, CPU).

* A stop signal (SIGTERM to torchrun, as Kubernetes or `kill` sends it; SIGUSR1 to one rank only)
  makes every rank finish the same step, checkpoint it and exit 75; resume=auto continues from that step.
* The seeded fault-injection campaign (bench/fault_campaign.py) with a reduced N: SIGKILL of a random
  rank, once while a checkpoint is being written and once at a random moment; the resumed runs end
  with the weights and loss history of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_fixtures import REPO

sys.path.insert(0, str(REPO / "bench"))
import fault_campaign as campaign  # noqa: E402

pytestmark = pytest.mark.slow
DEADLINE_S = 300


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return campaign.make_shards(tmp_path_factory.mktemp("preemption"))


def wait_until(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"{what} not seen (rc {proc.poll()})")


def stop_run(shards: Path, run_dir: Path, log: Path, target: str, sig: signal.Signals, done: int) -> int:
    """Start (or resume) a 500-step run, send SIG to TARGET once two steps after step DONE are logged;
    checks that every rank stopped at the same step after checkpointing it, and returns that step."""
    before = set((run_dir / "checkpoints").glob("step_*"))
    with open(log, "w") as out:
        proc = subprocess.Popen(campaign.train_cmd(shards, run_dir, steps=500, ckpt_every=1000),
                                env=campaign.env(), cwd=REPO, stdout=out, stderr=out)
        ranks: dict[int, int] = {}
        wait_until(lambda: len(ranks.update(campaign.workers(proc.pid)) or ranks) == 2, proc, "two workers")
        wait_until(lambda: len(campaign.loss_history(run_dir)) >= done + 2, proc, "two logged steps")
        if target == "launcher":
            proc.send_signal(sig)     # torchrun passes SIGTERM on to both workers
        else:
            os.kill(ranks[1], sig)    # rank 0 learns of it in the next step's all-reduce
        proc.wait(timeout=DEADLINE_S)
    text = log.read_text()
    stopped = sorted(set((run_dir / "checkpoints").glob("step_*")) - before)
    assert len(stopped) == 1, text[-3000:]
    step = json.loads((stopped[0] / "meta.json").read_text())["step"]
    assert done < step < 500, text[-3000:]
    assert text.count(f"at step {step} after writing its checkpoint") == 2, text[-3000:]   # every rank, same step
    assert f"stopped by {sig.name} at step {step}" in text, text[-3000:]
    return step


def test_stop_signals_checkpoint_the_current_step_and_resume_continues_there(shards, tmp_path):
    """SIGTERM to the launcher stops a run; its resumption is stopped by SIGUSR1 to rank 1 alone (one
    launch fewer than two separate runs); the last resumption finishes and every step was logged."""
    run_dir, step = tmp_path / "run", 0
    for n, (target, sig) in enumerate([("launcher", signal.SIGTERM), ("rank 1", signal.SIGUSR1)]):
        step = stop_run(shards, run_dir, tmp_path / f"train-{n}.log", target, sig, done=step)
    resumed = subprocess.run(campaign.train_cmd(shards, run_dir, steps=step + 2, ckpt_every=1000),
                             env=campaign.env(), cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"done at step {step + 2}" in resumed.stdout
    _, losses = campaign.outcome(run_dir, step + 2)
    assert sorted(losses) == list(range(1, step + 3))


def test_fault_campaign_reduced(shards, tmp_path):
    """Two trials (one kill during a checkpoint write, one at a random moment), 6 steps."""
    (tmp_path / "shards").symlink_to(shards)   # the campaign finds its shards there and skips preprocessing
    summary = campaign.run_campaign(campaign.build_parser().parse_args(
        ["--trials", "2", "--steps", "6", "--out", str(tmp_path)]))
    assert summary["kills"] == 2 and summary["mismatching_trials"] == 0, summary
