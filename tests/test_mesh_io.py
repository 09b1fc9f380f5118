"""Loading: every supported format, scenes with transforms, seam merging, and a clear reason for
every kind of bad input."""
from __future__ import annotations

import os

import numpy as np
import pytest
import trimesh
from conftest import BROKEN_DIR, MESH_DIR

from data_pipeline.preprocess.mesh_io import MeshError, load_mesh, normalise
from data_pipeline.schema import NORMALISED_HALF_EXTENT

TETRA = "v 0 0 0\nv 1 0 0\nv 0 {y} 0\nv 0 0 1\nf 1 3 2\nf 1 2 4\nf 1 4 3\nf 2 3 4\n"


@pytest.mark.parametrize("suffix", ["obj", "ply", "stl", "off", "glb", "gltf"])
def test_every_format_loads_the_same_closed_mesh(tmp_path, suffix):
    sphere = trimesh.creation.icosphere(subdivisions=2)
    path = tmp_path / f"sphere.{suffix}"
    sphere.export(path)
    mesh = load_mesh(path)
    assert len(mesh.faces) == len(sphere.faces)
    assert mesh.is_watertight           # STL stores triangle soup: vertices had to be merged
    assert mesh.volume == pytest.approx(sphere.volume, rel=1e-4)


def test_scene_is_flattened_with_node_transforms(tmp_path):
    scene = trimesh.Scene()
    box = trimesh.creation.box()
    scene.add_geometry(box, node_name="a", transform=trimesh.transformations.translation_matrix([5, 0, 0]))
    scene.add_geometry(box, node_name="b", transform=trimesh.transformations.scale_matrix(2.0))
    scene.export(tmp_path / "scene.glb")
    mesh = load_mesh(tmp_path / "scene.glb")
    assert len(mesh.faces) == 24
    np.testing.assert_allclose(mesh.bounds, [[-1, -1, -1], [5.5, 1, 1]], atol=1e-6)


def test_uv_seams_are_merged_and_degenerate_faces_dropped(tmp_path):
    spot = load_mesh(MESH_DIR / "spot.obj")          # split along UV seams in the file
    assert spot.is_watertight
    (tmp_path / "degenerate.obj").write_text(TETRA.format(y=1) + "f 1 1 2\nf 2 2 2\n")
    assert len(load_mesh(tmp_path / "degenerate.obj").faces) == 4


def test_normalise_centres_and_scales_the_bounding_box():
    mesh = trimesh.creation.box(extents=[4, 2, 1]).apply_translation([10, -3, 2])
    result = normalise(mesh)
    np.testing.assert_allclose(result.mesh.bounds, [[-0.95, -0.475, -0.2375], [0.95, 0.475, 0.2375]])
    np.testing.assert_allclose(result.center, [10, -3, 2])
    back = result.mesh.vertices / result.scale + result.center
    np.testing.assert_allclose(back, mesh.vertices)
    assert result.scale == pytest.approx(2 * NORMALISED_HALF_EXTENT / 4)


BAD_INPUTS = {
    "zero.obj": (b"", "empty file"),
    "nan.obj": (TETRA.format(y="nan").encode(), "NaN or infinite"),
    "inf.obj": (TETRA.format(y="inf").encode(), "NaN or infinite"),
    "lines.obj": (b"v 0 0 0\nv 1 0 0\nv 0 1 0\nl 1 2\nl 2 3\n", "no faces"),
    "random.glb": (os.urandom(3000), "unreadable glb"),
    "thing.fbx": (b"Kaydara FBX Binary", "unsupported format '.fbx'"),
    "noext": (b"solid", "unsupported format '(no extension)'"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_has_a_clear_reason(tmp_path, name):
    data, reason = BAD_INPUTS[name]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(MeshError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        load_mesh(tmp_path / name)


def test_truncated_binary_files_are_rejected(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=2)
    for suffix in ("ply", "stl", "glb"):
        data = sphere.export(file_type=suffix)
        (tmp_path / f"cut.{suffix}").write_bytes(data[: len(data) // 2])
        with pytest.raises(MeshError):
            load_mesh(tmp_path / f"cut.{suffix}")


@pytest.mark.parametrize("name,reason", [
    ("empty.obj", "no geometry"),
    ("obj_points.obj", "point cloud"),
    ("ply_empty_header.ply", "no geometry"),
    ("notenoughindices.obj", "only 1 non-degenerate face"),
])
def test_bundled_broken_files(name, reason):
    with pytest.raises(MeshError, match=reason):
        load_mesh(BROKEN_DIR / name)
