"""The SLURM launchers on a real two-node SLURM cluster running on this machine.

tests/slurm/start_cluster.sh installs Debian's slurm-wlm + munge if needed and starts slurmctld
and two slurmd ("nodes" n1, n2). The tests then submit the project's own sbatch scripts:
  - launchers/slurm/preprocess.sbatch as a 2-task array: the union of the shards holds every
    mesh exactly once;
  - launchers/slurm/train.sbatch on 2 nodes (one CPU process each, gloo): it trains, checkpoints
    and logs one MLflow run with world size 2; a second submission resumes that run.
Every job has a SLURM time limit and the test a deadline, so a hang fails instead of stalling.
SLURM is a required component: when the cluster cannot start (including start_cluster.sh's exit code
3, slurm cannot be installed: no root / no apt-get) the tests fail with the script's output, never skip.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from multiproc import tail

from trainer.checkpoint import read_meta

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from fault_campaign import loss_history  # noqa: E402

START = ROOT / "tests" / "slurm" / "start_cluster.sh"
STOP = ROOT / "tests" / "slurm" / "stop_cluster.sh"
STATE_DIR = Path(os.environ.get("SHAPEFLOW_SLURM_DIR", "/tmp/shapeflow-slurm"))
MESHES = ("suzanne.obj", "fuze.obj", "BoxTextured.glb", "multibody.stl")
PREPROCESS_CONFIG = ROOT / "configs" / "preprocess" / "tiny.yaml"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
JOB_DEADLINE_S = 420  # per submission; the sbatch --time limit below is a little longer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _daemons_running() -> bool:
    pid_files = [STATE_DIR / "slurmctld.pid", STATE_DIR / "slurmd-n1.pid", STATE_DIR / "slurmd-n2.pid"]
    for pid_file in pid_files:
        try:
            os.kill(int(pid_file.read_text()), 0)
        except (OSError, ValueError):
            return False
    return True


@pytest.fixture(scope="session")
def slurm_env():
    """Environment for slurm commands (SLURM_CONF set); stops the cluster afterwards if it started it."""
    was_running = _daemons_running()
    try:
        proc = subprocess.run(["bash", str(START), str(STATE_DIR)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail("tests/slurm/start_cluster.sh did not finish in 900 s")
    # SLURM is a required component (.ci/run installs it): a cluster that cannot start fails the test
    # run; it never turns into a skip (exit code 3 is "slurm cannot be installed here")
    assert proc.returncode == 0, f"start_cluster.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    match = re.search(r"^export SLURM_CONF=(\S+)$", proc.stdout, re.M)
    assert match, f"start_cluster.sh printed no SLURM_CONF line: {proc.stdout!r}"
    env = dict(os.environ, SLURM_CONF=match.group(1))
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(key, None)  # the run's own sqlite store in run.dir
    yield env
    if not was_running:
        subprocess.run(["bash", str(STOP), str(STATE_DIR)], capture_output=True, timeout=60)


def _job_states(job_id: str, env: dict) -> dict[str, str]:
    """JobId (array tasks as ID_TASK) -> JobState, from slurmctld's memory of recent jobs."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                         env=env, timeout=30).stdout
    states = {}
    for line in out.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "JobState" not in fields:
            continue
        task = fields.get("ArrayTaskId")
        key = f"{fields['ArrayJobId']}_{task}" if task and "-" not in task and "," not in task else fields["JobId"]
        states[key] = fields["JobState"]
    return states


def submit_and_wait(args: list[str], env: dict, cwd: Path, expect_tasks: int = 1) -> dict[str, str]:
    """sbatch ARGS, wait until every (array) task is finished; cancel and fail after the deadline."""
    proc = subprocess.run(["sbatch", "--parsable", "--time=9", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    job_id = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + JOB_DEADLINE_S
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = _job_states(job_id, env)
        if len(states) >= expect_tasks and all(s in TERMINAL for s in states.values()):
            return states
        time.sleep(2)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    outputs = [Path(a.split("=", 1)[1]).parent for a in args if a.startswith("--output=")]
    pytest.fail(f"job {job_id} not finished after {JOB_DEADLINE_S} s: {states}\n"
                + "\n".join(_logs(folder) for folder in outputs))


def _logs(folder: Path, chars: int | None = 4000) -> str:
    """Every job and node log under ``folder``: the last ``chars`` of each (failure messages), or all of
    it with ``chars=None`` (assertions on a line that may be anywhere)."""
    return "\n".join(f"---- {p}\n{tail(p, chars) if chars else p.read_text(errors='replace')}"
                     for p in sorted(folder.rglob("*.out")))


# ---------------------------------------------------------------------------
# preprocessing as a job array
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def preprocessed(slurm_env, tmp_path_factory):
    """Two array tasks preprocess four bundled meshes into one shard directory."""
    work = tmp_path_factory.mktemp("slurm_preprocess")
    meshes = work / "meshes"
    meshes.mkdir()
    for name in MESHES:
        shutil.copy(ROOT / "assets" / "meshes" / name, meshes / name)
    out = work / "shards"
    states = submit_and_wait(
        ["--array=0-1", "--cpus-per-task=1", f"--output={work}/preprocess-%A_%a.out",
         str(ROOT / "launchers" / "slurm" / "preprocess.sbatch"), str(meshes), str(out),
         "--config", str(PREPROCESS_CONFIG), "shard_max_samples=1"],
        slurm_env, cwd=ROOT, expect_tasks=2)
    return {"meshes": meshes, "out": out, "states": states, "work": work}


def _shard_sources(out: Path) -> list[str]:
    """The `source` of every sample in every shard under OUT (one entry per sample)."""
    sources = []
    for shard in sorted(out.rglob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    sources.append(json.load(tar.extractfile(member))["source"])
    return sources


def test_preprocess_array_covers_every_mesh_once(preprocessed):
    states, work = preprocessed["states"], preprocessed["work"]
    assert len(states) == 2, states
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{_logs(work)}"
    sources = sorted(Path(s).name for s in _shard_sources(preprocessed["out"]))
    assert sources == sorted(MESHES), f"{sources}\n{_logs(work)}"
    # each task really did a part: both logs name their own task index
    logs = [p.read_text() for p in sorted(work.glob("preprocess-*.out"))]
    assert len(logs) == 2
    assert any("task 0 of 2" in text for text in logs) and any("task 1 of 2" in text for text in logs)


# ---------------------------------------------------------------------------
# two-node training, then a resubmission that resumes
# ---------------------------------------------------------------------------

def _mlflow_runs(run_dir: Path):
    from mlflow.tracking import MlflowClient  # imported here: only these tests need it

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    return client, runs


def _world_size(run) -> str | None:
    for source in (run.data.params, run.data.tags, run.data.metrics):
        for key, value in source.items():
            if key.split(".")[-1] == "world_size":
                return str(int(float(value)))
    return None


def _train(slurm_env, work: Path, shards: Path, run_dir: Path, max_steps: int, tag: str) -> dict[str, str]:
    logs = work / f"logs-{tag}"
    env = dict(slurm_env, SHAPEFLOW_LOG_DIR=str(logs))
    return submit_and_wait(
        ["-N", "2", f"--output={work}/train-{tag}-%j.out",
         str(ROOT / "launchers" / "slurm" / "train.sbatch"), str(ROOT / "configs" / "vecset_vae_debug.yaml"),
         f"run.dir={run_dir}", f"run.max_steps={max_steps}", "run.ckpt_every=2", "run.log_every=1",
         "run.eval_every=0", "run.progress=false", f"data.path={shards}", "data.batch_size=2",
         "optim.warmup_steps=1", "eval.num_samples=1", "eval.grid_resolution=16"],
        env, cwd=ROOT)


def test_two_node_training_logs_one_run_and_resumes(slurm_env, preprocessed, tmp_path):
    assert set(preprocessed["states"].values()) == {"COMPLETED"}, "preprocessing failed (see the test above)"
    shards, run_dir = preprocessed["out"], tmp_path / "run"

    states = _train(slurm_env, tmp_path, shards, run_dir, max_steps=2, tag="first")
    assert list(states.values()) == ["COMPLETED"], f"{states}\n{_logs(tmp_path)}"
    node_logs = sorted((tmp_path / "logs-first").glob("*.out"))
    assert len(node_logs) == 2, "one log per node expected"
    client, runs = _mlflow_runs(run_dir)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert _world_size(run) == "2", ("the run must record its world size in MLflow (a param, tag or metric "
                                     f"named *world_size*): params {run.data.params}, tags {run.data.tags}")
    first_steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert first_steps and first_steps[-1] == 2, first_steps
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    assert checkpoints, "no checkpoint written"
    assert read_meta(checkpoints[-1])["world_size"] == 2

    # a second submission (as a requeue would do) continues the same run from step 2
    states = _train(slurm_env, tmp_path, shards, run_dir, max_steps=4, tag="second")
    assert list(states.values()) == ["COMPLETED"], f"{states}\n{_logs(tmp_path)}"
    client, runs = _mlflow_runs(run_dir)
    assert [r.info.run_id for r in runs] == [run.info.run_id], "the resumed job must reattach to its MLflow run"
    history = client.get_metric_history(run.info.run_id, "loss")
    steps = [m.step for m in history]
    assert sorted(set(steps)) == sorted(set(first_steps) | {3, 4}), steps
    assert len(steps) == len(set(steps)), f"steps logged twice (training restarted from scratch?): {steps}"
    assert read_meta(sorted((run_dir / "checkpoints").glob("step_*"))[-1])["step"] == 4


# ---------------------------------------------------------------------------
# preemption: the warning signal checkpoints the current step, the requeued job resumes from it
# ---------------------------------------------------------------------------

def _loss_steps(run_dir: Path) -> list[int]:
    """Every logged loss step of a finished job (a step logged twice appears twice)."""
    client, runs = _mlflow_runs(run_dir)
    return [m.step for r in runs for m in client.get_metric_history(r.info.run_id, "loss")]


def _last_logged_step(run_dir: Path) -> int:
    """While the job runs: read-only from its sqlite store (an MlflowClient would create or migrate
    the database and race the job doing the same: alembic 'expected to match one row')."""
    return max(loss_history(run_dir), default=0)


def _wait_for(predicate, what: str, deadline_s: float, job_id: str, env: dict):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    pytest.fail(f"job {job_id}: {what} not seen after {deadline_s} s")


def test_warning_signal_checkpoints_the_current_step_and_the_requeued_job_resumes_there(
        slurm_env, preprocessed, tmp_path):
    """`scancel --batch --signal=USR1` is what `--signal=B:USR1@120` delivers before the time limit."""
    assert set(preprocessed["states"].values()) == {"COMPLETED"}, "preprocessing failed (see the test above)"
    run_dir, max_steps = tmp_path / "run", 40
    env = dict(slurm_env, SHAPEFLOW_LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.run(
        ["sbatch", "--parsable", "--time=9", "-N", "2", f"--output={tmp_path}/train-%j.out",
         str(ROOT / "launchers" / "slurm" / "train.sbatch"), str(ROOT / "configs" / "vecset_vae_debug.yaml"),
         f"run.dir={run_dir}", f"run.max_steps={max_steps}", "run.ckpt_every=1000", "run.log_every=1",
         "run.eval_every=0", "run.progress=false", f"data.path={preprocessed['out']}", "data.batch_size=2",
         "optim.warmup_steps=1", "eval.num_samples=1", "eval.grid_resolution=16"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    _wait_for(lambda: _last_logged_step(run_dir) >= 3, "step 3", JOB_DEADLINE_S, job_id, env)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=env, check=True, timeout=30)
    stopped = _wait_for(lambda: sorted((run_dir / "checkpoints").glob("step_*")), "the preemption checkpoint",
                        120, job_id, env)
    step = read_meta(stopped[0])["step"]
    assert 3 <= step < max_steps and step % 1000, f"checkpoint at {step}\n{_logs(tmp_path)}"
    _wait_for(lambda: _job_states(job_id, env).get(job_id) == "COMPLETED"
              and read_meta(sorted((run_dir / "checkpoints").glob("step_*"))[-1])["step"] == max_steps,
              "the requeued job finishing", JOB_DEADLINE_S, job_id, env)
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    assert "Restarts=1" in out, out
    steps = _loss_steps(run_dir)
    assert sorted(set(steps)) == list(range(1, max_steps + 1)), steps
    assert len(steps) == len(set(steps)), f"steps after {step} trained twice: {steps}"
    # the whole logs: the requeued job's lines can push this one out of any fixed-size tail
    assert "stopped by SIGTERM at step" in _logs(tmp_path, chars=None), _logs(tmp_path)
