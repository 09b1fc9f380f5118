"""One mesh -> one sample, checked against analytic oracles (sphere, torus, box, two spheres, plate).

Shapes are written to files and moved/scaled away from the normalised box first, so the stored
center/scale are exercised too: original = normalised / scale + center.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import ANALYTIC_SHAPES, analytic_shape

from data_pipeline import schema
from data_pipeline.preprocess.config import PreprocessConfig, SamplingConfig, WatertightConfig
from data_pipeline.preprocess.pipeline import MeshTask, file_sha256, mesh_id, process_mesh
from data_pipeline.preprocess.sampling import fps_first, fps_order

OFFSET, SCALE = np.array([3.0, -2.0, 0.5]), 7.0     # the file holds  mesh * SCALE + OFFSET


def small_config(resolution: int) -> PreprocessConfig:
    return PreprocessConfig(
        watertight=WatertightConfig(resolution=resolution, coarse_resolution=16),
        sampling=SamplingConfig(surface_points=3000, surface_fps_points=256, sharp_points=600, sharp_fps_points=64,
                                volume_points=6000, near_points_per_sigma=3000, sharp_near_points_per_sigma=300),
        occupancy_resolution=32)


def processed(name: str, tmp_path, resolution: int = 64):
    shape = analytic_shape(name)
    moved = shape.mesh.copy()
    moved.apply_scale(SCALE)
    moved.apply_translation(OFFSET)
    path = tmp_path / f"{name}.ply"
    moved.export(path)
    task = MeshTask(str(path), path.name, mesh_id(path.name, file_sha256(path)))
    return shape, process_mesh(task, small_config(resolution))


def normalised_sdf(shape, sample, xyz: np.ndarray) -> np.ndarray:
    """Analytic SDF at normalised points: distances scale by meta.scale / SCALE."""
    meta = sample["json"]
    original = xyz / meta["scale"] + np.asarray(meta["center"])
    return shape.sdf((original - OFFSET) / SCALE) * SCALE * meta["scale"]


@pytest.fixture(scope="module", params=ANALYTIC_SHAPES)
def shape_sample(request, tmp_path_factory):
    resolution = 128 if request.param == "thin_plate" else 64
    shape, sample = processed(request.param, tmp_path_factory.mktemp(request.param), resolution)
    return request.param, shape, sample, 2.0 / resolution


def test_sdf_sign_and_error_against_analytic(shape_sample):
    name, shape, sample, voxel = shape_sample
    for key in ("vol", "near"):
        xyz = schema.dequantize_coords(sample[f"{key}.npy"]).astype(np.float64)
        stored = sample[f"{key}_sdf.npy"].astype(np.float64)
        truth = normalised_sdf(shape, sample, xyz)
        far = np.abs(truth) > 2 * voxel
        assert np.mean(np.sign(stored[far]) == np.sign(truth[far])) >= 0.999, f"{name}/{key}: sign"
        near = ~far
        assert near.any()
        assert np.abs(stored[near] - truth[near]).max() < voxel, f"{name}/{key}: error near the surface"


def test_surface_points_on_surface_with_outward_normals(shape_sample):
    name, shape, sample, voxel = shape_sample
    points = schema.dequantize_coords(sample["surface.npy"]).astype(np.float64)
    assert np.abs(normalised_sdf(shape, sample, points)).max() < 0.5 * voxel
    normals = schema.dequantize_normals(sample["surface_normal.npy"])
    # Outward: stepping along the normal leaves the solid, stepping against it enters it.
    step = 0.5 * voxel
    outside = normalised_sdf(shape, sample, points + step * normals) > normalised_sdf(shape, sample, points - step * normals)
    assert outside.mean() > 0.99


def test_occupancy_grid_matches_analytic_inside(shape_sample):
    name, shape, sample, voxel = shape_sample
    R = sample["json"]["occ_resolution"]
    occ = schema.unpack_occupancy(sample["occ.npy"], R)
    centres = schema.occupancy_grid_centers(R).reshape(-1, 3).astype(np.float64)
    truth = normalised_sdf(shape, sample, centres)
    clear = np.abs(truth) > 2 * voxel
    assert (occ.reshape(-1)[clear] == (truth[clear] < 0)).mean() >= 0.999
    assert occ.any()


def test_sample_layout_and_metadata(shape_sample):
    name, shape, sample, voxel = shape_sample
    for key, (dtype, _) in schema.ARRAY_KEYS.items():
        if key in schema.OPTIONAL_KEYS and key not in sample:
            continue
        assert sample[key].dtype == np.dtype(dtype), key
    meta = sample["json"]
    assert meta["schema_version"] == schema.SCHEMA_VERSION
    assert meta["counts"]["surface"] == 3000 and meta["counts"]["vol"] == 6000 and meta["counts"]["near"] == 6000
    fps = sample["surface_fps.npy"]
    assert len(fps) == 256 and len(np.unique(fps)) == 256 and fps.max() < 3000
    # stored FPS order first: the orders are 0..K-1 and the json says so
    assert meta["fps_prefix_stored"] is True
    np.testing.assert_array_equal(fps, np.arange(256))
    np.testing.assert_array_equal(sample["sharp_fps.npy"], np.arange(len(sample["sharp_fps.npy"])))


def test_stored_surface_prefix_is_greedy_farthest_point(shape_sample):
    """The stored rows 0..K-1 are an FPS order of the stored points (mapped through the new layout)."""
    name, shape, sample, voxel = shape_sample
    points = schema.dequantize_coords(sample["surface.npy"]).astype(np.float64)
    np.testing.assert_array_equal(reference_fps(points, 16, 0), np.arange(16), err_msg=name)


def test_fps_first_puts_the_order_first_and_keeps_the_rest_in_place():
    order = np.array([5, 2, 7], dtype=np.int32)
    perm = fps_first(order, 9)
    np.testing.assert_array_equal(perm, [5, 2, 7, 0, 1, 3, 4, 6, 8])
    points = np.random.default_rng(0).normal(size=(3000, 3))
    order = fps_order(points, 64, bucket_height=5)
    stored = points[fps_first(order, len(points))]
    np.testing.assert_array_equal(stored[:64], points[order])
    # greedy FPS on the stored layout, started at row 0, is 0..K-1
    np.testing.assert_array_equal(reference_fps(stored, 64, 0), np.arange(64))


def test_sharp_points_on_box_edges_and_none_on_sphere(tmp_path):
    box, sample = processed("box", tmp_path)
    sharp = schema.dequantize_coords(sample["sharp.npy"]).astype(np.float64)
    assert len(sharp) == 600 and len(sample["sharp_fps.npy"]) == 64
    original = (sharp / sample["json"]["scale"] + sample["json"]["center"] - OFFSET) / SCALE
    # On an edge of the box: two coordinates at their extreme (|x| = half extent), within a voxel.
    half = np.array([0.8, 0.5, 0.3])
    voxel_original = 2 / 64 / sample["json"]["scale"] / SCALE
    at_extreme = np.abs(np.abs(original) - half) < 1.5 * voxel_original
    assert (at_extreme.sum(axis=1) >= 2).mean() > 0.99
    _, sphere_sample = processed("sphere", tmp_path)
    assert sphere_sample["sharp.npy"].shape == (0, 3) and "sharp_near.npy" not in sphere_sample


def test_quantised_coordinates_within_one_step():
    rng = np.random.default_rng(0)
    xyz = rng.uniform(-schema.COORD_RANGE, schema.COORD_RANGE, size=(100_000, 3))
    back = schema.dequantize_coords(schema.quantize_coords(xyz))
    assert np.abs(back - xyz).max() <= schema.COORD_STEP


def reference_fps(points: np.ndarray, count: int, first: int) -> np.ndarray:
    chosen = [first]
    gap = np.linalg.norm(points - points[first], axis=1)
    for _ in range(count - 1):
        chosen.append(int(np.argmax(gap)))
        gap = np.minimum(gap, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return np.array(chosen)


@pytest.mark.parametrize("n", [20, 3000])   # plain FPS below one bucket, bucket FPS above
def test_fps_order_is_greedy_farthest_point_and_prefix_stable(n):
    points = np.random.default_rng(n).normal(size=(n, 3))
    order = fps_order(points, 16, bucket_height=5)
    np.testing.assert_array_equal(order, reference_fps(points, 16, int(order[0])))
    np.testing.assert_array_equal(fps_order(points, 8, bucket_height=5), order[:8])


def test_same_mesh_same_sample(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, first = processed("two_spheres", tmp_path / "a")
    _, second = processed("two_spheres", tmp_path / "b")
    for key in ("surface.npy", "vol.npy", "vol_sdf.npy", "occ.npy", "surface_fps.npy"):
        np.testing.assert_array_equal(first[key], second[key])
