"""Watertight conversion against analytic shapes, open and inverted inputs, and the dense baseline."""
from __future__ import annotations

import numpy as np
import pytest
import trimesh
from conftest import ANALYTIC_SHAPES, MESH_DIR, analytic_shape

from data_pipeline.preprocess.closest_point import in_spatial_order
from data_pipeline.preprocess.config import WatertightConfig
from data_pipeline.preprocess.mesh_io import merge_parts, normalise, read_parts
from data_pipeline.preprocess.mesh_queries import FAST_ACCURACY, RECHECK_MARGIN, MeshQueries
from data_pipeline.preprocess.watertight import (
    FIELD_CLIP_VOXELS,
    AmbiguousWindingError,
    WatertightError,
    _cell_corners,
    _cells_touching_surface,
    _grid_points,
    make_watertight,
    signed_grid,
)

FAST = dict(coarse_resolution=16)


@pytest.mark.parametrize("name", ANALYTIC_SHAPES)
def test_closed_output_with_analytic_volume(name):
    shape = analytic_shape(name)
    resolution = 128 if name == "thin_plate" else 64     # the plate is 0.1 thick: >= 6 voxels at 128
    result = make_watertight(shape.mesh, WatertightConfig(resolution=resolution, **FAST))
    assert result.mesh.is_watertight
    assert result.mesh.volume == pytest.approx(shape.volume, rel=0.02)
    # Narrow band: exact distances on a thin shell only, not on the whole grid.
    assert result.grid.band_points < 0.35 * (resolution + 1) ** 3


def test_surface_lies_on_the_analytic_surface():
    shape = analytic_shape("torus")
    result = make_watertight(shape.mesh, WatertightConfig(resolution=64, **FAST))
    assert np.abs(shape.sdf(result.mesh.vertices)).max() < 0.5 * result.grid.voxel


def _without_faces(mesh: trimesh.Trimesh, drop) -> trimesh.Trimesh:
    keep = ~drop(mesh.triangles_center)
    return trimesh.Trimesh(mesh.vertices, mesh.faces[keep], process=False)


@pytest.mark.parametrize("opening", ["open_box", "cut_sphere"])
def test_wide_hole_gives_a_solid_not_a_hollow_shell(opening):
    if opening == "open_box":   # the whole top face is missing
        box = analytic_shape("box")
        mesh, closed_volume = _without_faces(box.mesh.subdivide().subdivide(), lambda c: c[:, 2] > 0.29), box.volume
    else:                       # a cap of radius 0.6 cut off a sphere of radius 0.8
        sphere = analytic_shape("sphere")
        mesh, closed_volume = _without_faces(sphere.mesh, lambda c: c[:, 2] > 0.5), sphere.volume
    assert not mesh.is_watertight
    result = make_watertight(mesh, WatertightConfig(resolution=64, **FAST))
    assert result.mesh.is_watertight
    # A hollow shell of thickness 2 voxels would hold about a third of the volume.
    assert 0.9 * closed_volume < result.mesh.volume < 1.15 * closed_volume


def test_inverted_faces_still_give_the_solid():
    shape = analytic_shape("sphere")
    shape.mesh.invert()
    result = make_watertight(shape.mesh, WatertightConfig(resolution=64, **FAST))
    assert result.mesh.volume == pytest.approx(shape.volume, rel=0.02)


def test_open_sheet_becomes_a_thin_closed_slab():
    plate = trimesh.creation.box(extents=[1.6, 1.6, 0.2]).subdivide().subdivide()
    sheet = _without_faces(plate, lambda c: c[:, 2] < 0.09)   # only the top face: an open square
    # w is fractional over most of the volume: the winding method refuses, the shell method shells it.
    with pytest.raises(AmbiguousWindingError):
        make_watertight(sheet, WatertightConfig(resolution=64, **FAST))
    result = make_watertight(sheet, WatertightConfig(resolution=64, **FAST), method="shell")
    voxel = result.grid.voxel
    assert result.mesh.is_watertight
    assert len(result.mesh.split()) == 1
    # A shell of half-thickness eps = 1 voxel around a 1.6 x 1.6 square.
    assert 1.6 * 1.6 * 1 * voxel < result.mesh.volume < 1.6 * 1.6 * 3 * voxel


def test_solid_smaller_than_a_voxel_raises():
    flat = trimesh.Trimesh([[0, 0, 0], [1e-9, 0, 0], [0, 1e-9, 0], [0, 0, 1e-9]], [[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]])
    with pytest.raises(WatertightError, match="no volume|no inside"):
        make_watertight(flat, WatertightConfig(resolution=16, coarse_resolution=8))


def test_narrow_band_field_equals_dense_field():
    """The refinement + band shortcut must give the same field as computing everything densely."""
    shape = analytic_shape("two_spheres")
    cfg = WatertightConfig(resolution=32, coarse_resolution=8)
    fast, dense = signed_grid(shape.mesh, cfg), signed_grid(shape.mesh, cfg, dense=True)
    assert ((fast.field < 0) == (dense.field < 0)).all()
    band = np.abs(fast.field) < FIELD_CLIP_VOXELS * fast.voxel * 0.999
    np.testing.assert_allclose(fast.field[band], dense.field[band], atol=1e-6)
    assert fast.winding_evaluations < 0.5 * dense.winding_evaluations


@pytest.mark.parametrize("name", ["teapot.obj", "multibody.stl", "CesiumMilkTruck.glb", "wallhole.obj"])
def test_two_pass_winding_numbers_decide_like_the_default_accuracy(name):
    """Open, inconsistently oriented and large-triangle inputs: grid points near the surface (where
    the fast pass errs most) and uniform ones. Every |w| > t decision equals the default accuracy's,
    and the fast pass stays well inside the recheck margin."""
    mesh = normalise(merge_parts(read_parts(str(MESH_DIR / name)), min_faces=4)).mesh
    queries = MeshQueries(mesh)
    grid = _grid_points(np.nonzero(_cell_corners(_cells_touching_surface(mesh, 64))), 64)
    rng = np.random.default_rng(0)
    xyz = np.concatenate([grid, rng.uniform(-1, 1, size=(5_000, 3))])
    two_pass = np.abs(queries.winding(xyz))
    bvh = queries._winding._bvh
    default = np.abs(in_spatial_order(bvh.winding_number, xyz))
    fast = np.abs(in_spatial_order(lambda q: bvh.winding_number(q, FAST_ACCURACY), xyz))
    for threshold in queries.thresholds:
        assert ((two_pass > threshold) == (default > threshold)).all(), threshold
    assert np.abs(fast - default).max() < RECHECK_MARGIN / 2
