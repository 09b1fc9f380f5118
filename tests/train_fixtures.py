"""Shared pieces of the training tests: real shards from `shapeflow preprocess` and fast overrides.

``SHAPEFLOW_TEST_SHARDS=/path/to/shards`` reuses an existing shard directory instead of preprocessing
(handy when iterating on the trainer; CI leaves it unset).
"""
from __future__ import annotations

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
