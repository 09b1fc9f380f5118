"""Shared fixtures: procedural meshes with analytic SDFs, and a small real shard directory.

* ``analytic_shape(name)`` / :data:`ANALYTIC_SHAPES`: closed meshes whose exact signed distance
  (negative inside) and volume are known -- the oracle of the preprocessing tests.
* ``small_shards`` (session): ``shapeflow preprocess`` run on four bundled meshes (cow, fandisk,
  spot, wallhole) with configs/preprocess/tiny.yaml and 2 samples per shard: 4 samples in 2
  shards, manifest.json + one manifest part, an empty failures.jsonl. Returns the folder; treat it
  as read-only (copy it before damaging it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import trimesh

REPO = Path(__file__).resolve().parent.parent
MESH_DIR = REPO / "assets" / "meshes"
BROKEN_DIR = REPO / "tests" / "data" / "broken"
TINY_CONFIG = REPO / "configs" / "preprocess" / "tiny.yaml"
SMALL_SHARD_MESHES = ("cow.obj", "fandisk.obj", "spot.obj", "wallhole.obj")


@dataclass
class AnalyticShape:
    mesh: trimesh.Trimesh
    sdf: Callable[[np.ndarray], np.ndarray]   # float [n, 3] -> float [n], negative inside
    volume: float


def _box_sdf(half: np.ndarray, center=np.zeros(3)) -> Callable:
    def sdf(p):
        q = np.abs(p - center) - half
        return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0)
    return sdf


def _sphere(radius: float, center=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=5, radius=radius).apply_translation(center)


def analytic_shape(name: str) -> AnalyticShape:
    """A fresh copy of one procedural shape (all fit in [-0.95, 0.95]^3)."""
    if name == "sphere":
        r = 0.8
        return AnalyticShape(_sphere(r), lambda p: np.linalg.norm(p, axis=1) - r, 4 / 3 * np.pi * r ** 3)
    if name == "torus":
        R, r = 0.6, 0.25
        mesh = trimesh.creation.torus(major_radius=R, minor_radius=r, major_sections=128, minor_sections=48)
        sdf = lambda p: np.hypot(np.hypot(p[:, 0], p[:, 1]) - R, p[:, 2]) - r  # noqa: E731
        return AnalyticShape(mesh, sdf, 2 * np.pi ** 2 * R * r ** 2)
    if name == "box":
        half = np.array([0.8, 0.5, 0.3])
        return AnalyticShape(trimesh.creation.box(extents=2 * half), _box_sdf(half), float(np.prod(2 * half)))
    if name == "two_spheres":
        r, c = 0.35, np.array([0.5, 0.0, 0.0])
        mesh = trimesh.util.concatenate([_sphere(r, c), _sphere(r, -c)])
        sdf = lambda p: np.minimum(np.linalg.norm(p - c, axis=1), np.linalg.norm(p + c, axis=1)) - r  # noqa: E731
        return AnalyticShape(mesh, sdf, 2 * 4 / 3 * np.pi * r ** 3)
    if name == "thin_plate":
        half = np.array([0.8, 0.8, 0.05])
        return AnalyticShape(trimesh.creation.box(extents=2 * half), _box_sdf(half), float(np.prod(2 * half)))
    raise KeyError(name)


ANALYTIC_SHAPES = ("sphere", "torus", "box", "two_spheres", "thin_plate")


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """Folder of real shards from four bundled meshes (see the module docstring)."""
    from trainer import commands as cli

    out = tmp_path_factory.mktemp("small_shards") / "shards"
    inputs = [str(MESH_DIR / name) for name in SMALL_SHARD_MESHES]
    rc = cli.main(["preprocess", *inputs, "--out", str(out), "--config", str(TINY_CONFIG),
                   "--workers", "2", "--no-progress", "shard_max_samples=2"])
    assert rc == 0, f"shapeflow preprocess exited with {rc}"
    return out


# The shared fixtures of loader_fixtures.py and train_fixtures.py are registered here, once. A test
# module that imports a fixture function gets its own definition of it, so a session-scoped fixture
# imported by twelve modules was built twelve times (preprocessing, a 300-step training run); test
# modules take these by argument name and do not import them.
from loader_fixtures import loader_shards, shard_copy  # noqa: E402, F401
from train_fixtures import accelerate_finetunes, one_torch_thread, quality_vae, train_shards  # noqa: E402, F401
