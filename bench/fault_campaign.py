"""Seeded fault-injection campaign: SIGKILL a random rank of a 2-process training run at a random
moment (half of the trials: while a checkpoint is being written), resume with run.resume=auto, and
compare the final weights and the per-step loss history with an uninterrupted run of the same seed.

    python bench/fault_campaign.py [--trials 10] [--seed 0] [--steps 12] [--out /tmp/fault_campaign]

Each run is `torchrun --nproc_per_node 2 -m trainer.commands train vecset_vae_debug ...` on shards
preprocessed from four bundled meshes (configs/preprocess/tiny.yaml). A kill "during a checkpoint
write" waits until ``checkpoints/.tmp-step_XXXXXXXX`` (the directory a checkpoint is written into
before its atomic rename) appears and kills at once; whether a temporary directory existed at the
moment of the kill is recorded for every trial. The loss of a step is the last value logged for it
(steps between the last checkpoint and the kill are trained, and logged, twice). Prints one JSON
line per trial and a summary; exits 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # run as a script: the project need not be installed
MESHES = ("suzanne.obj", "spot.obj", "teapot.obj", "cow.obj")
RESUME_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI",
                "MLFLOW_RUN_ID"):
        out.pop(key, None)
    return out


def make_shards(out: Path) -> Path:
    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        cmd = [sys.executable, "-m", "trainer.commands", "preprocess",
               *(str(REPO / "assets/meshes" / m) for m in MESHES), "--out", str(shards),
               "--config", str(REPO / "configs/preprocess/tiny.yaml"), "shard_max_samples=1", "--no-progress"]
        subprocess.run(cmd, env=env(), cwd=REPO, check=True, capture_output=True)
    return shards


def train_cmd(shards: Path, run_dir: Path, steps: int, ckpt_every: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "trainer.commands", "train", "vecset_vae_debug", f"data.path={shards}", f"run.dir={run_dir}",
            f"run.max_steps={steps}", f"run.ckpt_every={ckpt_every}", "run.log_every=1", "run.keep_last=2",
            "run.progress=false", "run.eval_every=0", "data.batch_size=1", "optim.warmup_steps=2",
            "data.options={num_surface: 128, num_vol: 128, num_near: 128}", "eval.num_samples=1",
            "eval.grid_resolution=16", "eval.sample_steps=2", "engine.timeout_s=300"]


def workers(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the training processes torchrun started."""
    import psutil

    found = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "trainer.commands" in " ".join(child.cmdline()):
            found[int(rank)] = child.pid
    return found


def writing_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob(".tmp-step_*"))


def wait_for(predicate, proc: subprocess.Popen, poll_s: float) -> bool:
    while proc.poll() is None:
        if predicate():
            return True
        time.sleep(poll_s)
    return False


def kill_once(cmd: list[str], run_dir: Path, victim: int, when, log) -> dict:
    """Start a run and SIGKILL rank ``victim`` when ``when(run_dir, started)`` first holds."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=log, stderr=log)
    ranks = {}
    wait_for(lambda: len(ranks.update(workers(proc.pid)) or ranks) == 2, proc, 0.05)
    fired = wait_for(lambda: when(run_dir, started), proc, 0.005)
    during_write = writing_checkpoint(run_dir)
    if fired and victim in ranks:
        try:
            os.kill(ranks[victim], 9)
        except ProcessLookupError:
            fired = False
    rc = proc.wait(timeout=600)
    return {"killed": fired, "during_checkpoint_write": fired and during_write, "rc": rc}


def resume(cmd_factory, log) -> int:
    for attempt in range(RESUME_ATTEMPTS):
        rc = subprocess.run(cmd_factory(), env=env(), cwd=REPO, stdout=log, stderr=log).returncode
        if rc == 0:
            return attempt + 1
    raise RuntimeError(f"resume=auto did not finish in {RESUME_ATTEMPTS} attempts")


def outcome(run_dir: Path, steps: int) -> tuple[dict, dict[int, float]]:
    """(final network weights, step -> last logged loss) of a finished run."""
    from trainer.checkpoint import network_state

    weights = network_state(run_dir / "checkpoints" / f"step_{steps:08d}", use_ema=False)
    return weights, loss_history(run_dir)


def loss_history(run_dir: Path) -> dict[int, float]:
    """step -> last logged loss in the run's MLflow store; empty before the first log.

    Read straight from the sqlite file, read-only: an MlflowClient would create or migrate the
    database and can race the training job doing the same."""
    import sqlite3

    db = run_dir / "mlflow.db"
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
            rows = con.execute("SELECT step, value FROM metrics WHERE key = 'loss' ORDER BY step, timestamp").fetchall()
    except sqlite3.OperationalError:   # the job is still creating its tables
        return {}
    return {int(step): float(value) for step, value in rows}


def compare(got: tuple, want: tuple, rtol: float) -> list[str]:
    import torch

    problems = []
    if sorted(got[1]) != sorted(want[1]):
        problems.append(f"logged steps {sorted(got[1])} != {sorted(want[1])}")
    problems += [f"loss at step {s}: {got[1][s]} != {v}" for s, v in want[1].items()
                 if s in got[1] and abs(got[1][s] - v) > rtol * max(abs(v), 1e-12)]
    problems += [f"weight {k}" for k, w in want[0].items()
                 if not torch.allclose(got[0][k].float(), w.float(), rtol=rtol, atol=1e-7)]
    return problems


def trial_moment(rng: random.Random, index: int, steps: int, ckpt_every: int, duration: float):
    """When to kill: at a chosen checkpoint's write (even trials) or at a random time (odd trials)."""
    if index % 2 == 0:
        step = ckpt_every * rng.randrange(1, steps // ckpt_every)   # not the final one: the run must go on
        return f"checkpoint step {step}", lambda d, t0: (d / "checkpoints" / f".tmp-step_{step:08d}").exists()
    delay = rng.uniform(0.15, 0.9) * duration
    return f"{delay:.1f} s after start", lambda d, t0: time.monotonic() - t0 >= delay


def run_campaign(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shards = make_shards(out)
    reference = out / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    tic = time.monotonic()
    with open(out / "reference.log", "w") as log:
        subprocess.run(train_cmd(shards, reference, args.steps, args.ckpt_every), env=env(), cwd=REPO,
                       stdout=log, stderr=log, check=True)
    duration = time.monotonic() - tic
    want = outcome(reference, args.steps)
    rng = random.Random(args.seed)
    trials = []
    for index in range(args.trials):
        run_dir = out / f"trial_{index:03d}"
        shutil.rmtree(run_dir, ignore_errors=True)
        victim = rng.randrange(2)
        moment, when = trial_moment(rng, index, args.steps, args.ckpt_every, duration)
        with open(out / f"trial_{index:03d}.log", "w") as log:
            killed = kill_once(train_cmd(shards, run_dir, args.steps, args.ckpt_every), run_dir, victim, when, log)
            resumes = resume(partial(train_cmd, shards, run_dir, args.steps, args.ckpt_every), log)
        problems = compare(outcome(run_dir, args.steps), want, args.rtol)
        trials.append({"trial": index, "victim_rank": victim, "moment": moment, **killed, "resume_runs": resumes,
                       "mismatches": problems})
        print(json.dumps(trials[-1]), flush=True)
    summary = {"trials": len(trials), "kills": sum(t["killed"] for t in trials),
               "kills_during_checkpoint_writes": sum(t["during_checkpoint_write"] for t in trials),
               "mismatching_trials": sum(bool(t["mismatches"]) for t in trials),
               "reference_s": round(duration, 1), "seed": args.seed, "steps": args.steps}
    (out / "summary.json").write_text(json.dumps({"summary": summary, "trials": trials}, indent=1))
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--ckpt-every", type=int, default=2)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--out", default="/tmp/fault_campaign")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = run_campaign(args)
    print(json.dumps(summary))
    return 1 if summary["mismatching_trials"] or summary["kills"] < summary["trials"] else 0


if __name__ == "__main__":
    sys.exit(main())
