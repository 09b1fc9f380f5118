"""Previews (issue 11 item 14): cropped to the object, reconstruction next to the input."""
from pathlib import Path

import numpy as np
import trimesh

from trainer import meshing

REPO = Path(__file__).resolve().parent.parent


def small_spot() -> trimesh.Trimesh:
    """The bundled cow scaled to ~0.3 of the box, off centre: what an early reconstruction looks like."""
    mesh = trimesh.load(REPO / "assets/meshes/spot.obj", force="mesh")
    v = mesh.vertices - mesh.vertices.mean(0)
    mesh.vertices = v / np.abs(v).max() * 0.3 + 0.2
    return mesh


def ink_columns(path: Path) -> np.ndarray:
    """Per image column: whether it holds drawn (non-white) pixels, ignoring the title rows."""
    import matplotlib.image as mpimg
    img = mpimg.imread(path)[..., :3]
    body = img[int(0.1 * img.shape[0]):]
    return (body < 0.9).any(axis=2).any(axis=0)


def test_preview_is_cropped_to_the_object(tmp_path):
    ink = ink_columns(meshing.save_preview(small_spot(), tmp_path / "p.png", "spot"))
    cols = np.flatnonzero(ink)
    assert (cols[-1] - cols[0]) > 0.5 * len(ink)          # the [-1, 1] box framing gave ~0.2


def test_preview_shows_the_input_next_to_the_reconstruction(tmp_path):
    mesh = small_spot()
    points = np.asarray(mesh.sample(2000, seed=0))
    ink = ink_columns(meshing.save_preview(mesh, tmp_path / "p.png", "spot", reference=points))
    half = len(ink) // 2
    assert ink[:half].mean() > 0.25 and ink[half:].mean() > 0.25   # both panels drawn, each filled
