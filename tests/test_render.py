"""Condition views (schema v2): rendered pixels against exact projections, the stored cameras against
real meshes, texture colours, rerun determinism, and v1 shards still loading."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image
from train_fixtures import FAST

from data_pipeline import cameras, schema
from data_pipeline.loading.batches import BadSample, parse_task_options, sample_arrays
from data_pipeline.loading.loader import make_loader
from data_pipeline.preprocess.appearance import colored_parts
from data_pipeline.preprocess.mesh_io import read_parts
from data_pipeline.preprocess.render import render_views
from trainer import commands as cli
from trainer.config import load_train_config
from trainer.loop import train

REPO = Path(__file__).resolve().parent.parent
MESH_DIR = REPO / "assets" / "meshes"
SIZE = 192
RIG = cameras.CameraRig(resolution=SIZE)
VIEW_CONFIG = """\
watertight: {resolution: 32, coarse_resolution: 16}
sampling: {surface_points: 1024, surface_fps_points: 256, sharp_points: 64, sharp_fps_points: 32,
           volume_points: 512, near_points_per_sigma: 256, sharp_near_points_per_sigma: 0}
occupancy_resolution: 16
views: 3
render: {resolution: 160}
"""
REAL_MESHES = ("spot.obj", "Duck.glb", "CesiumMilkTruck.glb", "fandisk.obj", "wallhole.obj")


def pixel_rays(k: np.ndarray) -> np.ndarray:
    """Unit camera-space directions [S, S, 3] through every pixel centre (row, column)."""
    u, v = np.meshgrid(np.arange(SIZE) + 0.5, np.arange(SIZE) + 0.5)
    d = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1)
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def sphere_silhouette(k, w2c, radius: float) -> np.ndarray:
    """Pixels whose ray through the centre hits the sphere of ``radius`` at the origin."""
    centre = w2c[:3, 3]                      # the origin in camera coordinates
    along = pixel_rays(k) @ centre
    return centre @ centre - along ** 2 < radius ** 2


def convex_silhouette(k, w2c, corners: np.ndarray) -> np.ndarray:
    """Pixels whose centre lies inside the convex hull of the projected corners (a convex solid)."""
    from scipy.spatial import Delaunay
    uv, _ = cameras.project(corners, k, w2c)
    u, v = np.meshgrid(np.arange(SIZE) + 0.5, np.arange(SIZE) + 0.5)
    return (Delaunay(uv).find_simplex(np.c_[u.ravel(), v.ravel()]) >= 0).reshape(SIZE, SIZE)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("shape", ["sphere", "box"])
def test_analytic_silhouettes_match_exact_projections(shape):
    if shape == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=6, radius=0.9)
        def exact(k, w2c):
            return sphere_silhouette(k, w2c, 0.9)
    else:
        mesh = trimesh.creation.box(extents=(1.8, 1.0, 1.4))
        def exact(k, w2c):
            return convex_silhouette(k, w2c, mesh.vertices)
    cams = cameras.sample_cameras("00ff00ff00ff00ff00ff00ff", 4, RIG)
    images = render_views(colored_parts([mesh], np.zeros(3), 1.0), cams, SIZE)
    for image, cam in zip(images, cams):
        k, w2c = np.array(cam["intrinsics"]), np.array(cam["world_to_camera"])
        assert image.shape == (SIZE, SIZE, 4) and image.dtype == np.uint8
        assert iou(image[..., 3] >= 128, exact(k, w2c)) >= 0.98
        assert image[..., 3][~exact(k, w2c)].mean() < 10       # nothing drawn far off the shape


def test_cameras_frame_the_box_and_follow_the_opencv_convention():
    cams = cameras.sample_cameras("0123456789abcdef01234567", 8, RIG)
    corners = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T
    elevations = []
    for cam in cams:
        k, w2c = np.array(cam["intrinsics"]), np.array(cam["world_to_camera"])
        rotation = w2c[:3, :3]
        assert np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-9) and np.linalg.det(rotation) > 0
        uv, depth = cameras.project(corners, k, w2c)
        assert (depth > 0).all() and (uv >= 0).all() and (uv <= SIZE).all()   # [-1, 1]^3 in view
        up_in_image = cameras.project(np.array([[0, 0, 0], [0, 0.5, 0]]), k, w2c)[0]
        assert up_in_image[1, 1] < up_in_image[0, 1]              # world +y is up: smaller row
        position = -rotation.T @ w2c[:3, 3]
        elevations.append(np.degrees(np.arcsin(position[1] / np.linalg.norm(position))))
    assert all(-10 - 1e-9 <= e <= 40 + 1e-9 for e in elevations)
    assert cams == cameras.sample_cameras("0123456789abcdef01234567", 8, RIG)       # same id, same cameras


@pytest.fixture(scope="module")
def view_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("views")
    (root / "views.yaml").write_text(VIEW_CONFIG)
    rc = cli.main(["preprocess", *[str(MESH_DIR / m) for m in REAL_MESHES], "--out", str(root / "shards"),
                   "--config", str(root / "views.yaml"), "--no-progress"])
    assert rc == 0
    return root / "shards"


def shard_members(folder: Path) -> dict[str, dict[str, bytes]]:
    """{id: {key: bytes}} of every sample in the folder's shards."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                sample_id, key = member.name.split(".", 1)
                samples.setdefault(sample_id, {})[key] = tar.extractfile(member).read()
    return samples


def test_real_mesh_surface_points_land_on_covered_pixels(view_shards):
    samples = shard_members(view_shards)
    assert len(samples) == len(REAL_MESHES)
    for members in samples.values():
        meta = json.loads(members["json"])
        assert meta["schema_version"] == 2 and len(meta["views"]) == 3
        # points on the *input* surface, moved into the sample's normalised space with the stored centre/scale
        source = trimesh.util.concatenate(read_parts(MESH_DIR / meta["source"]))
        points = (trimesh.sample.sample_surface(source, 20000, seed=0)[0] - meta["center"]) * meta["scale"]
        for index, cam in enumerate(meta["views"]):
            alpha = np.asarray(Image.open(io.BytesIO(members[schema.view_key(index)])))[..., 3]
            uv, depth = cameras.project(points, cam["intrinsics"], cam["world_to_camera"])
            assert (depth > 0).all()
            cols, rows = np.floor(uv).astype(int).T
            covered = alpha[np.clip(rows, 0, alpha.shape[0] - 1), np.clip(cols, 0, alpha.shape[1] - 1)] > 0
            assert covered.mean() >= 0.99, (meta["source"], index, covered.mean())


def test_textured_glb_renders_its_texture_colours():
    """BoxTextured.glb: every face carries the same texture, so the covered pixels' mean colour is
    the texture's mean colour times the shading: the same hue (chromaticity) and a plausible brightness."""
    parts = read_parts(MESH_DIR / "BoxTextured.glb")
    texture = np.asarray(parts[0].visual.material.baseColorTexture.convert("RGB"), np.float64)
    factor = parts[0].visual.material.baseColorFactor
    expected = texture.reshape(-1, 3).mean(axis=0) * (1 if factor is None else np.asarray(factor[:3]) / 255)
    mesh = trimesh.util.concatenate(parts)
    centre = mesh.bounds.mean(axis=0)
    scale = 1.9 / (mesh.bounds[1] - mesh.bounds[0]).max()
    cams = cameras.sample_cameras("feedfeedfeedfeedfeedfeed", 4, RIG)
    for image in render_views(colored_parts(parts, centre, scale), cams, SIZE):
        rgb = image[..., :3][image[..., 3] == 255].astype(np.float64)
        got = rgb.mean(axis=0)
        assert np.abs(got / got.sum() - expected / expected.sum()).max() < 0.03, (got, expected)
        assert 0.5 < got.sum() / expected.sum() < 1.05        # lit by ambient 0.35 + key light 0.65
    grey = render_views(colored_parts([trimesh.creation.box()], np.zeros(3), 1.0), cams[:1], SIZE)[0]
    assert np.ptp(grey[..., :3][grey[..., 3] == 255].astype(int), axis=1).max() == 0     # untextured: neutral grey


def test_obj_with_uvs_but_no_material_renders_neutral_grey():
    """spot.obj has texture coordinates and no .mtl: trimesh gives it a placeholder 2x2 texture of grey
    100/255. It must render exactly as the same geometry without any visual (the neutral grey), not
    darker than every other uncoloured mesh."""
    parts = read_parts(MESH_DIR / "spot.obj")
    assert parts[0].visual.kind == "texture"          # the case under test: UVs, trimesh's placeholder material
    bare = [trimesh.Trimesh(p.vertices, p.faces, process=False) for p in parts]
    mesh = trimesh.util.concatenate(bare)
    centre, scale = mesh.bounds.mean(axis=0), 1.9 / (mesh.bounds[1] - mesh.bounds[0]).max()
    cams = cameras.sample_cameras("spot", 2, RIG)
    got = render_views(colored_parts(parts, centre, scale), cams, SIZE)
    want = render_views(colored_parts(bare, centre, scale), cams, SIZE)
    for a, b in zip(got, want):
        assert (a[..., 3] > 0).mean() > 0.02
        np.testing.assert_array_equal(a, b)


def test_rerun_gives_identical_pixels(view_shards, tmp_path):
    (tmp_path / "views.yaml").write_text(VIEW_CONFIG)
    rc = cli.main(["preprocess", str(MESH_DIR / "Duck.glb"), str(MESH_DIR / "spot.obj"), "--out",
                   str(tmp_path / "again"), "--config", str(tmp_path / "views.yaml"), "--no-progress"])
    assert rc == 0
    first, again = shard_members(view_shards), shard_members(tmp_path / "again")
    assert len(again) == 2
    for sample_id, members in again.items():
        for index in range(3):
            key = schema.view_key(index)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(members[key]))),
                                  np.asarray(Image.open(io.BytesIO(first[sample_id][key]))))
        assert json.loads(members["json"])["views"] == json.loads(first[sample_id]["json"])["views"]


def test_loader_returns_a_view_for_the_image_task(view_shards):
    loader = make_loader(view_shards, task="dit", batch_size=2, mode="train", seed=0, num_surface=64,
                         condition="image")
    batch = next(iter(loader))
    assert batch["view"].shape == (2, 160, 160, 4) and batch["view"].dtype.is_floating_point is False
    assert batch["view_intrinsics"].shape == (2, 3, 3) and batch["view_world_to_camera"].shape == (2, 4, 4)
    assert set(batch["view_index"].tolist()) <= {0, 1, 2}
    fixed = make_loader(view_shards, task="dit", batch_size=2, mode="eval", seed=0, num_surface=64,
                        condition="image", view=2)
    assert next(iter(fixed))["view_index"].tolist() == [2, 2]


def write_v1_copy(src: Path, dst: Path) -> None:
    """The folder as schema v1 would have it: no view members, json without views, schema_version 1."""
    dst.mkdir()
    for path in src.iterdir():
        if path.suffix != ".tar":
            path_text = path.read_text().replace('"schema_version": 2', '"schema_version": 1')
            (dst / path.name).write_text(path_text)
            continue
        with tarfile.open(path) as tar, tarfile.open(dst / path.name, "w") as out:
            for member in tar.getmembers():
                if ".view_" in member.name:
                    continue
                data = tar.extractfile(member).read()
                if member.name.endswith(".json"):
                    meta = json.loads(data)
                    meta.pop("views")
                    meta["schema_version"] = 1
                    data = json.dumps(meta).encode()
                member.size = len(data)
                out.addfile(member, io.BytesIO(data))


def test_v1_shards_still_train_the_vae_and_refuse_images(view_shards, tmp_path):
    write_v1_copy(view_shards, tmp_path / "v1")
    summary = train(load_train_config("vecset_vae_debug", [f"data.path={tmp_path / 'v1'}",
                                                           f"run.dir={tmp_path / 'run'}", *FAST, "run.max_steps=2"]))
    assert summary["step"] == 2 and summary["skipped_steps"] == 0
    raw = next(iter(shard_members(tmp_path / "v1").items()))
    raw = {"__key__": raw[0], **raw[1]}
    options = parse_task_options("dit", {"num_surface": 64, "condition": "image"})
    with pytest.raises(BadSample, match="no condition views .*schema_version 1"):
        sample_arrays(raw, "dit", options, np.random.default_rng(0))
