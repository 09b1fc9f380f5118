"""Shared pieces of the training tests: real shards from `shapeflow preprocess` and fast overrides.

``SHAPEFLOW_TEST_SHARDS=/path/to/shards`` reuses an existing shard directory instead of preprocessing
(handy when iterating on the trainer; CI leaves it unset).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from trainer import commands as cli

REPO = Path(__file__).resolve().parent.parent
MESHES = ["spot.obj", "suzanne.obj", "teapot.obj", "cow.obj"]

TINY_PREPROCESS = """\
watertight: {resolution: 32, coarse_resolution: 16}
sampling:
  surface_points: 2048
  surface_fps_points: 512
  sharp_points: 128
  sharp_fps_points: 64
  volume_points: 1024
  near_points_per_sigma: 512
  sharp_near_points_per_sigma: 64
occupancy_resolution: 16
shard_max_samples: 2
views: 4
render: {resolution: 112}
"""

# Small everything: a debug step takes a fraction of a second on one core.
FAST = [
    "data.batch_size=2",
    "data.options={num_surface: 256, num_vol: 256, num_near: 256}",
    "optim.warmup_steps=2",
    "eval.grid_resolution=16",
    "eval.num_samples=1",
    "eval.sample_steps=4",
    "run.progress=false",
]


def build_train_shards(out: Path) -> Path:
    config = out.parent / f"{out.name}.yaml"
    config.write_text(TINY_PREPROCESS)
    inputs = [str(REPO / "assets/meshes" / m) for m in MESHES]
    rc = cli.main(["preprocess", *inputs, "--out", str(out), "--config", str(config)])
    assert rc == 0, f"shapeflow preprocess failed with exit code {rc}"
    return out


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> Path:
    given = os.environ.get("SHAPEFLOW_TEST_SHARDS")
    if given:
        return Path(given)
    return build_train_shards(tmp_path_factory.mktemp("train") / "shards")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for a training-heavy test. On a shared CPU (other jobs, other test runs)
    two-thread kernels wait for each other's time slices and ran 4-5x slower here; alone on 2 idle
    cores one thread costs at most 2x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The VecSet debug preset trained until it reconstructs the training shapes (tests/test_vae_quality.py
# holds it to IoU > 0.9 on one shape); shared so that evaluation tests check a model that learned.
QUALITY = [
    "data.batch_size=4",
    "data.options={num_surface: 256, num_vol: 512, num_near: 256}",
    "run.max_steps=300", "run.log_every=25", "run.ckpt_every=300", "run.eval_every=0",
    "ema.decay=0.9",
    "eval.grid_resolution=16", "eval.num_samples=1",
    "run.progress=false",
]


@pytest.fixture(scope="session")
def quality_vae(train_shards, tmp_path_factory) -> dict:
    """{"run_dir", "checkpoint", "summary", "seconds"} of the QUALITY run on the training shards."""
    import time

    import torch

    from trainer.config import load_train_config
    from trainer.loop import train

    run_dir = tmp_path_factory.mktemp("quality_vae") / "vae"
    before = torch.get_num_threads()
    torch.set_num_threads(1)   # see one_torch_thread
    tic = time.perf_counter()
    try:
        summary = train(load_train_config("vecset_vae_debug", [f"data.path={train_shards}", f"run.dir={run_dir}",
                                                              *QUALITY]))
    finally:
        torch.set_num_threads(before)
    return {"run_dir": run_dir, "checkpoint": run_dir / "checkpoints" / "step_00000300", "summary": summary,
            "seconds": time.perf_counter() - tic}


# ---------------------------------------------------------------------------------------------------
# fine-tuning an imported release under accelerate launch, resumed under torchrun (two test files)
# ---------------------------------------------------------------------------------------------------

HUNYUAN_ANCHOR = Path(__file__).parent / "data" / "anchors" / "hunyuan3d-2.1-vae"
# strategy name -> (engine.strategy it resolves to, accelerate config)
ACCELERATE_CONFIGS = {"zero2": ("deepspeed", "configs/accelerate/zero2.yaml"),
                      "fsdp2": ("fsdp2", "configs/accelerate/fsdp2.yaml")}
LAUNCH_TIMEOUT_S = 400   # one 2-process launch; DeepSpeed start-up is slow on a loaded 2-core machine


def launch_train(launcher: list[str], config: str, overrides: list[str], log_dir: Path) -> str:
    """Run one launcher command to exit code 0 (bounded); returns its output."""
    import sys

    from multiproc import run_commands

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", *launcher, "-m", "trainer.commands", "train", config, *overrides]
    ranks = run_commands([cmd], envs=[env], cwd=REPO, log_dir=log_dir, timeout_s=LAUNCH_TIMEOUT_S)   # exit code 0
    return ranks.output(0, 100_000)


def saved_engine(run_dir: Path, step: int) -> dict:
    """engine.strategy / zero_stage as run.dir/config.yaml, the checkpoint and the MLflow params say."""
    import yaml
    from mlflow.tracking import MlflowClient

    checkpoint = run_dir / "checkpoints" / f"step_{step:08d}"
    meta = json.loads((checkpoint / "meta.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(meta["mlflow_run_id"])
    keys = ("strategy", "zero_stage")
    return {"config.yaml": tuple(yaml.safe_load((run_dir / "config.yaml").read_text())["engine"][k] for k in keys),
            "checkpoint": tuple(yaml.safe_load((checkpoint / "config.yaml").read_text())["engine"][k] for k in keys),
            "mlflow": tuple(run.data.params[f"engine.{k}"] for k in keys),
            "meta": (meta["strategy"], meta["world_size"]), "tags": run.data.tags,
            "resolved_from": meta["resolved_from"], "config.yaml text": (run_dir / "config.yaml").read_text()}


class AccelerateFinetunes:
    """Per accelerate config (built on first use): `accelerate launch --config_file <config>
    --num_processes 2 ... train vecset_vae_debug model.init_from=<imported Hunyuan3D-2.1 anchor>` for
    2 steps, then the saved run.dir/config.yaml rerun under torchrun to step 3 (resume=auto). One pair
    of launches serves test_finetune (an imported release fine-tunes, resumes, exports) and
    test_strategies (the accelerate-resolved strategy is saved and reruns under torchrun): each
    2-process DeepSpeed / FSDP launch costs tens of seconds here."""

    def __init__(self, root: Path, shards: Path):
        self.root, self.shards, self.done = root, shards, {}
        self.imported = root / "hy.safetensors"

    def get(self, name: str) -> dict:
        """{"imported", "run_dir", "accelerate_output", "after_accelerate" (saved_engine at step 2 before
        the rerun), "torchrun_output"} of config ``name``."""
        if name not in self.done:
            if not self.imported.exists():
                assert cli.main(["import", "hunyuan3d-2.1-vae", str(HUNYUAN_ANCHOR), "--out", str(self.imported)]) == 0
            self.done[name] = self._run(name, self.root / name)
        return self.done[name]

    def _run(self, name: str, work: Path) -> dict:
        run_dir = work / "run"
        first = launch_train(["accelerate.commands.launch", "--config_file", ACCELERATE_CONFIGS[name][1],
                              "--num_processes", "2", "--main_process_port", str(free_port())], "vecset_vae_debug",
                             [f"data.path={self.shards}", f"run.dir={run_dir}", *FAST, "run.max_steps=2",
                              "run.ckpt_every=2", "run.eval_every=0", f"model.init_from={self.imported}",
                              "ema.enabled=false"], work / "accelerate_logs")
        after_accelerate = saved_engine(run_dir, 2)   # before the rerun retags the MLflow run
        second = launch_train(["torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
                               "127.0.0.1", "--master_port", str(free_port())], str(run_dir / "config.yaml"),
                              ["run.max_steps=3"], work / "torchrun_logs")
        return {"imported": self.imported, "run_dir": run_dir, "accelerate_output": first,
                "after_accelerate": after_accelerate, "torchrun_output": second}


@pytest.fixture(scope="session")
def accelerate_finetunes(train_shards, tmp_path_factory) -> AccelerateFinetunes:
    return AccelerateFinetunes(tmp_path_factory.mktemp("accelerate_finetunes"), train_shards)
