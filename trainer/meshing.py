"""From a decoded shape to a mesh: SDF on a grid by chunked queries, marching cubes, export, preview PNG.

Grid convention: ``R`` cell centres per axis over [-COORD_RANGE, COORD_RANGE] (axes x, y, z, C order),
the same as the shard schema's occupancy grid. Values are SDF-like: negative inside, zero at the surface.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from data_pipeline.schema import COORD_RANGE, occupancy_grid_centers


@torch.no_grad()
def query_grid(query: Callable[[torch.Tensor], torch.Tensor], resolution: int, chunk: int,
               device: torch.device | str = "cpu") -> np.ndarray:
    """[R, R, R] values of ``query(xyz [1, Q, 3]) -> [1, Q]`` on the grid, ``chunk`` points at a time."""
    pts = torch.from_numpy(occupancy_grid_centers(resolution).reshape(-1, 3)).to(device)
    values = [query(pts[i:i + chunk][None]).float().reshape(-1).cpu() for i in range(0, len(pts), chunk)]
    return torch.cat(values).reshape(resolution, resolution, resolution).numpy()


def grid_to_mesh(values: np.ndarray, level: float = 0.0):
    """Marching cubes on an SDF-like grid over the schema box; None when the level set is empty."""
    import trimesh
    from skimage import measure

    if not (values.min() < level < values.max()):
        return None
    res = values.shape[0]
    spacing = 2 * COORD_RANGE / res
    # 'ascent': values increase outwards (SDF), so faces are oriented with outward normals
    verts, faces, _, _ = measure.marching_cubes(values.astype(np.float32), level=level, spacing=(spacing,) * 3,
                                                gradient_direction="ascent")
    verts = verts - COORD_RANGE + spacing / 2  # index space -> cell centres in normalised space
    return trimesh.Trimesh(verts, faces, process=False)


def save_mesh(mesh, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh.export(path)
    return path


def save_preview(mesh, path: Path, title: str = "") -> Path:
    """A shaded matplotlib render (no GPU/OpenGL needed) of the mesh, or an 'empty' card."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    fig = plt.figure(figsize=(4, 4))
    ax = fig.add_subplot(projection="3d")
    if mesh is None or len(mesh.faces) == 0:
        ax.text2D(0.3, 0.5, "empty level set", transform=ax.transAxes)
    else:
        faces = mesh.faces if len(mesh.faces) <= 40000 else mesh.faces[np.linspace(0, len(mesh.faces) - 1, 40000).astype(int)]
        tris = mesh.vertices[faces]
        normals = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        shade = 0.3 + 0.7 * np.clip(normals @ np.array([0.4, 0.3, 0.87]), 0, 1)
        # show y up: plot (x, z, y)
        ax.add_collection3d(Poly3DCollection(tris[:, :, [0, 2, 1]], facecolors=plt.cm.Greys(1 - shade * 0.8),
                                             linewidths=0))
    for setter in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
        setter(-1, 1)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def save_side_by_side(panels: list, path: Path, height: int = 256) -> Path:
    """One PNG of panels side by side, each an image file or a uint8 [H, W, 3|4] array (RGBA is
    composited on white), scaled to ``height`` pixels."""
    from PIL import Image
    images = []
    for panel in panels:
        image = Image.open(panel) if isinstance(panel, (str, Path)) else Image.fromarray(np.asarray(panel))
        flat = Image.new("RGBA", image.size, (255, 255, 255, 255))
        flat.alpha_composite(image.convert("RGBA"))
        images.append(flat.convert("RGB").resize((max(1, round(image.width * height / image.height)), height)))
    canvas = Image.new("RGB", (sum(i.width for i in images), height), (255, 255, 255))
    left = 0
    for image in images:
        canvas.paste(image, (left, 0))
        left += image.width
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def surface_points(mesh, count: int = 10000, seed: int = 0) -> torch.Tensor:
    """[count, 3] uniform points on the mesh (empty when there is no mesh)."""
    if mesh is None or len(mesh.faces) == 0:
        return torch.zeros(0, 3)
    import trimesh
    pts, _ = trimesh.sample.sample_surface(mesh, count, seed=seed)
    return torch.from_numpy(np.asarray(pts, dtype=np.float32))
