"""Point sets of one sample: surface and sharp-edge points with normals, farthest-point orders,
volume and near-surface queries (coordinates only; labelling is data_pipeline.preprocess.sdf)."""
from __future__ import annotations

import fpsample
import igl
import numpy as np
import trimesh

from data_pipeline.schema import COORD_RANGE


def sample_surface(mesh: trimesh.Trimesh, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted uniform points on ``mesh`` and their unit normals (vertex normals interpolated
    barycentrically, so they vary smoothly over the marching-cubes facets). float64 [n, 3] each."""
    areas = mesh.area_faces
    face = np.searchsorted(np.cumsum(areas), rng.random(count) * areas.sum())
    face = np.minimum(face, len(areas) - 1)
    # Uniform barycentric coordinates via the square-root trick.
    r1, r2 = np.sqrt(rng.random(count)), rng.random(count)
    bary = np.stack([1 - r1, r1 * (1 - r2), r1 * r2], axis=1)
    corners = mesh.vertices[mesh.faces[face]]                       # [n, 3 corners, 3]
    points = np.einsum("nc,ncd->nd", bary, corners)
    return points, interpolated_normals(mesh, face, bary)


def interpolated_normals(mesh: trimesh.Trimesh, face: np.ndarray, bary: np.ndarray) -> np.ndarray:
    normals = np.einsum("nc,ncd->nd", bary, mesh.vertex_normals[mesh.faces[face]])
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    # A vanishing average (opposite vertex normals) falls back to the face normal.
    flat = length[:, 0] < 1e-8
    normals[flat] = mesh.face_normals[face[flat]]
    length[flat] = 1.0
    return normals / length


def sharp_edges(mesh: trimesh.Trimesh, angle_deg: float) -> np.ndarray:
    """float64 [E, 2, 3]: edges shared by two faces whose normals differ by more than ``angle_deg``."""
    if len(mesh.face_adjacency) == 0:
        return np.zeros((0, 2, 3))
    sharp = mesh.face_adjacency_angles > np.radians(angle_deg)
    return mesh.vertices[mesh.face_adjacency_edges[sharp]]


def sample_sharp(source: trimesh.Trimesh, watertight: trimesh.Trimesh, angle_deg: float, count: int,
                 rng: np.random.Generator, closest=None) -> tuple[np.ndarray, np.ndarray]:
    """Points on the sharp edges of the (normalised) input, length-weighted, moved to the closest
    point of the watertight surface, with that surface's normal there. [M, 3] each; M = 0 if none.
    ``closest(xyz) -> (face [n], point [n, 3])`` reuses a search tree of ``watertight`` if given."""
    edges = sharp_edges(source, angle_deg)
    if len(edges) == 0 or count == 0:
        return np.zeros((0, 3)), np.zeros((0, 3))
    lengths = np.linalg.norm(edges[:, 1] - edges[:, 0], axis=1)
    edge = np.minimum(np.searchsorted(np.cumsum(lengths), rng.random(count) * lengths.sum()), len(edges) - 1)
    t = rng.random((count, 1))
    on_edges = edges[edge, 0] * (1 - t) + edges[edge, 1] * t
    if closest is None:
        _, face, points = igl.point_mesh_squared_distance(
            on_edges, np.ascontiguousarray(watertight.vertices), np.ascontiguousarray(watertight.faces, dtype=np.int64))
    else:
        face, points = closest(on_edges)
    bary = trimesh.triangles.points_to_barycentric(watertight.vertices[watertight.faces[face]], points)
    return points, interpolated_normals(watertight, face, np.clip(bary, 0, 1))


def fps_order(points: np.ndarray, count: int, bucket_height: int) -> np.ndarray:
    """int32 [min(count, n)]: farthest-point order (every prefix is the FPS subset of its size).

    fpsample's kd-line bucket FPS is exact FPS and deterministic; it picks its own first point
    (in fpsample 1.0.2 ``start_idx`` indexes its internal order, not ``points``)."""
    n = len(points)
    count = min(count, n)
    if count == 0:
        return np.zeros(0, dtype=np.int32)
    if n < 2 ** bucket_height:   # the bucket variant needs at least one full bucket
        return fpsample.fps_sampling(np.ascontiguousarray(points, dtype=np.float32), count, start_idx=0).astype(np.int32)
    order = fpsample.bucket_fps_kdline_sampling(points, count, h=bucket_height, start_idx=0)
    return order.astype(np.int32)


def fps_first(order: np.ndarray, count: int) -> np.ndarray:
    """int64 [count]: a permutation of ``range(count)`` that puts the rows of ``order`` first, in that
    order, then every other row in its original order. Storing points permuted by it makes the FPS
    order ``arange(len(order))``, so the loader takes FPS prefixes as contiguous slices."""
    rest = np.ones(count, dtype=bool)
    rest[order] = False
    return np.concatenate([order.astype(np.int64), np.flatnonzero(rest)])


def volume_queries(count: int, rng: np.random.Generator) -> np.ndarray:
    """float64 [count, 3] uniform in [-1.05, 1.05]^3."""
    return rng.uniform(-COORD_RANGE, COORD_RANGE, size=(count, 3))


def near_queries(mesh: trimesh.Trimesh, sigmas, per_sigma: int, rng: np.random.Generator,
                 anchors: np.ndarray | None = None) -> np.ndarray:
    """float64 [len(sigmas) * per_sigma, 3]: surface points (or the given ``anchors``) plus
    N(0, sigma^2) offsets, clamped into the quantisation box."""
    chunks = []
    for sigma in sigmas:
        if anchors is None:
            base, _ = sample_surface(mesh, per_sigma, rng)
        else:
            base = anchors[rng.integers(0, len(anchors), per_sigma)]
        chunks.append(base + rng.normal(0.0, sigma, size=base.shape))
    if not chunks:
        return np.zeros((0, 3))
    return np.clip(np.concatenate(chunks), -COORD_RANGE, COORD_RANGE)
