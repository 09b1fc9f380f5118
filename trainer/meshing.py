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


def view_bounds(mesh, reference: np.ndarray | None) -> tuple[np.ndarray, float]:
    """(centre [3], half side) of a cube around the mesh and the reference points with a 5 % margin,
    so a preview shows the object, not the whole [-1, 1] box; the box itself when both are empty."""
    parts = [np.asarray(mesh.vertices)] if mesh is not None and len(mesh.faces) else []
    if reference is not None and len(reference):
        parts.append(np.asarray(reference))
    if not parts:
        return np.zeros(3), 1.0
    pts = np.concatenate(parts)
    lo, hi = pts.min(0), pts.max(0)
    return (lo + hi) / 2, max(float((hi - lo).max()) / 2 * 1.05, 1e-3)


def _draw_mesh(ax, mesh) -> None:
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    if mesh is None or len(mesh.faces) == 0:
        ax.text2D(0.3, 0.5, "empty level set", transform=ax.transAxes)
        return
    faces = mesh.faces if len(mesh.faces) <= 40000 else mesh.faces[np.linspace(0, len(mesh.faces) - 1, 40000).astype(int)]
    tris = mesh.vertices[faces]
    normals = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    shade = 0.3 + 0.7 * np.clip(normals @ np.array([0.4, 0.3, 0.87]), 0, 1)
    # show y up: plot (x, z, y)
    ax.add_collection3d(Poly3DCollection(tris[:, :, [0, 2, 1]], facecolors=plt.cm.Greys(1 - shade * 0.8),
                                         linewidths=0))


def _frame(ax, centre: np.ndarray, half: float, title: str) -> None:
    for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre[[0, 2, 1]]):  # y up
        setter(c - half, c + half)
    ax.set_box_aspect((1, 1, 1), zoom=1.35)   # mplot3d pads its box: zoom in on the cube
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)


def save_preview(mesh, path: Path, title: str = "", reference: np.ndarray | None = None) -> Path:
    """A shaded matplotlib render (no GPU/OpenGL needed) of the mesh (or an 'empty' card), cropped to the
    object. With ``reference`` [P, 3] (the input's surface points) the input is drawn on the left and
    the mesh on the right, in the same frame, so a reconstruction can be judged against its input."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = None if reference is None else np.asarray(reference, dtype=np.float32)
    centre, half = view_bounds(mesh, reference)
    panels = 1 if reference is None else 2
    fig = plt.figure(figsize=(4 * panels, 4.2))
    if reference is not None:
        ax = fig.add_subplot(1, 2, 1, projection="3d")
        pts = reference[np.linspace(0, len(reference) - 1, min(len(reference), 4000)).astype(int)]
        ax.scatter(pts[:, 0], pts[:, 2], pts[:, 1], s=1.5, c=pts[:, 1], cmap="viridis", linewidths=0)
        _frame(ax, centre, half, "input")
    ax = fig.add_subplot(1, panels, panels, projection="3d")
    _draw_mesh(ax, mesh)
    _frame(ax, centre, half, "reconstruction" if reference is not None else "")
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=0.92, wspace=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
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
