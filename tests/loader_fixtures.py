"""Real shards for the loader and inspect tests: `shapeflow preprocess` on bundled meshes.

Tiny sampling counts and 3 samples per shard, written by two preprocessing jobs
(``--num-jobs 2``, as a SLURM array would) so that the shard sizes are uneven
and the directory holds one manifest part per job. One broken input adds a
failures.jsonl entry.
"""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from trainer import commands as cli

REPO = Path(__file__).resolve().parent.parent
MESHES = ["cow.obj", "fandisk.obj", "featuretype.STL", "multibody.stl", "spot.obj", "suzanne.obj",
          "teapot.obj", "wallhole.obj", "BoxTextured.glb"]
BROKEN = "tests/data/broken/empty.obj"
OCC_RESOLUTION = 8

TINY_CONFIG = """\
watertight: {{resolution: 32, coarse_resolution: 16}}
sampling:
  surface_points: 1024
  surface_fps_points: 256
  sharp_points: 128
  sharp_fps_points: 64
  volume_points: 512
  near_points_per_sigma: 256
  sharp_near_points_per_sigma: 64
occupancy_resolution: {occ}
shard_max_samples: 3
views: 2
render: {{resolution: 32}}
"""


def build_shards(out: Path) -> Path:
    config = out.parent / f"{out.name}.yaml"
    config.write_text(TINY_CONFIG.format(occ=OCC_RESOLUTION))
    inputs = [str(REPO / "assets/meshes" / m) for m in MESHES] + [str(REPO / BROKEN)]
    codes = [cli.main(["preprocess", *inputs, "--out", str(out), "--config", str(config), "--no-progress",
                       "--job-index", str(job), "--num-jobs", "2"]) for job in (0, 1)]
    # exit code 3: "some inputs failed"; exactly one job got the broken input
    assert sorted(codes) == [0, 3], f"shapeflow preprocess jobs exited with {codes}"
    assert len((out / "failures.jsonl").read_text().splitlines()) == 1
    return out


@pytest.fixture(scope="session")
def loader_shards(tmp_path_factory) -> Path:
    """A shard directory (several uneven shards + manifest) written by the real preprocessor."""
    return build_shards(tmp_path_factory.mktemp("loader") / "shards")


@pytest.fixture
def shard_copy(loader_shards, tmp_path) -> Path:
    """A private copy that a test may damage."""
    return Path(shutil.copytree(loader_shards, tmp_path / "shards"))


def shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.tar"))


def stored_samples(directory: Path, paths: list[Path] | None = None) -> dict[str, dict]:
    """Every sample of the shards (default: all), read with plain tarfile: id -> {key: array or json dict}."""
    samples: dict[str, dict] = {}
    for path in shard_files(directory) if paths is None else paths:
        with tarfile.open(path) as tar:
            grouped: dict[str, dict] = {}
            for member in tar.getmembers():
                key, _, suffix = member.name.partition(".")
                data = tar.extractfile(member).read()
                if suffix == "json":
                    value = json.loads(data)
                else:      # condition views stay PNG bytes
                    value = data if suffix.endswith(".png") else np.load(io.BytesIO(data))
                grouped.setdefault(key, {})[suffix] = value
        for key, sample in grouped.items():
            samples[str(sample["json"].get("id", key))] = sample
    return samples
