"""Loading input meshes into one clean triangle mesh, and the normalisation of docs/design.md section 2.

Every problem with an input raises :class:`MeshError` whose message is the reason written to
failures.jsonl (the caller adds the file name).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

from data_pipeline.schema import NORMALISED_HALF_EXTENT

MESH_EXTENSIONS = (".obj", ".ply", ".stl", ".off", ".glb", ".gltf")
# Files that sit next to meshes (materials, textures, buffers, docs): skipped silently when scanning folders.
COMPANION_EXTENSIONS = (
    ".mtl", ".bin", ".png", ".jpg", ".jpeg", ".bmp", ".tga", ".tif", ".tiff", ".webp", ".ktx2",
    ".md", ".txt", ".json", ".yaml", ".yml",
)


class MeshError(ValueError):
    """An input that is not a usable triangle mesh; the message is the reason."""


@dataclass
class NormalisedMesh:
    mesh: trimesh.Trimesh      # vertices in normalised space: (original - center) * scale
    center: np.ndarray         # float64 [3] bounding-box centre of the original
    scale: float               # 2 * 0.95 / longest bounding-box side


def is_mesh_file(path: Path) -> bool:
    return path.suffix.lower() in MESH_EXTENSIONS


def load_mesh(path: str | Path, min_faces: int = 4) -> trimesh.Trimesh:
    """Read ``path`` as one triangle mesh: scenes flattened with their node transforms, duplicate
    vertices merged (also across UV seams and normal splits), degenerate faces dropped."""
    return merge_parts(read_parts(path), min_faces)


def read_parts(path: str | Path) -> list[trimesh.Trimesh]:
    """The triangle geometries of ``path`` in world coordinates (scene node transforms applied),
    with their visuals (materials, UVs, colours) kept for rendering condition views."""
    path = Path(path)
    if not is_mesh_file(path):
        raise MeshError(f"unsupported format {path.suffix or '(no extension)'!r} "
                        f"(supported: {', '.join(MESH_EXTENSIONS)})")
    if path.stat().st_size == 0:
        raise MeshError("empty file (0 bytes)")
    parts = _triangle_parts(_read(path))
    for part in parts:
        _check_finite(part)
    return parts


def merge_parts(parts: list[trimesh.Trimesh], min_faces: int = 4) -> trimesh.Trimesh:
    """The parts of :func:`read_parts` as one clean mesh (plain geometry, merged vertices)."""
    mesh = trimesh.util.concatenate(parts) if len(parts) > 1 else parts[0]
    return _clean(mesh, min_faces)


def _read(path: Path):
    try:
        return trimesh.load(str(path), process=False)
    except Exception as err:  # trimesh raises many types for truncated or random bytes
        raise MeshError(f"unreadable {path.suffix.lower()[1:]} file ({type(err).__name__}: {err})"[:500]) from None


def _triangle_parts(loaded) -> list[trimesh.Trimesh]:
    """Scene or geometry -> its Trimesh parts in world coordinates; point clouds and line sets are rejected."""
    if isinstance(loaded, trimesh.Scene):
        parts = loaded.dump()  # every node's geometry with its transform applied
    else:
        parts = [loaded]
    triangles = [p for p in parts if isinstance(p, trimesh.Trimesh) and len(p.faces) > 0]
    if triangles:
        return triangles
    kinds = {type(p).__name__ for p in parts}
    vertex_count = sum(len(getattr(p, "vertices", ())) for p in parts)
    if vertex_count == 0:
        raise MeshError("no geometry: no vertices and no faces (empty file or unrecognised content)")
    if "PointCloud" in kinds:
        raise MeshError(f"point cloud: {vertex_count} vertices and no faces")
    if kinds == {"Trimesh"}:   # trimesh drops OBJ line elements, so a wireframe OBJ lands here too
        raise MeshError(f"no faces: {vertex_count} vertices only (a point cloud or a wireframe)")
    raise MeshError(f"wireframe: only lines/curves ({', '.join(sorted(kinds))}), no faces")


def _check_finite(mesh: trimesh.Trimesh) -> None:
    bad = ~np.isfinite(np.asarray(mesh.vertices)).all(axis=1)
    if bad.any():
        raise MeshError(f"{int(bad.sum())} vertices are NaN or infinite")


def _clean(mesh: trimesh.Trimesh, min_faces: int) -> trimesh.Trimesh:
    # Plain geometry only: materials and UVs would keep seam vertices apart.
    mesh = trimesh.Trimesh(vertices=np.asarray(mesh.vertices, dtype=np.float64),
                           faces=np.asarray(mesh.faces, dtype=np.int64), process=False)
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.remove_unreferenced_vertices()
    if len(mesh.faces) < min_faces:
        raise MeshError(f"only {len(mesh.faces)} non-degenerate face(s); at least {min_faces} needed to bound a solid")
    return mesh


def normalise(mesh: trimesh.Trimesh) -> NormalisedMesh:
    """Centre the bounding box at 0 and scale the longest side to [-0.95, 0.95]."""
    lo, hi = mesh.bounds
    extent = float((hi - lo).max())
    if not extent > 0:
        raise MeshError("zero-size bounding box (all vertices coincide)")
    center = (lo + hi) / 2
    scale = 2 * NORMALISED_HALF_EXTENT / extent
    moved = trimesh.Trimesh(vertices=(mesh.vertices - center) * scale, faces=mesh.faces, process=False)
    return NormalisedMesh(mesh=moved, center=center, scale=scale)
