"""Signed distances of query points to the watertight mesh (negative inside, docs/design.md section 2).

* Distance: ClosestPoints.query for every query (fcpw's float32 BVH picks the triangle, float64 distance
  to it; 0 <= error <= 1e-5, docs/data.md "Label distances"). (A k-d tree over surface samples was
  measured slower: far queries see many nearly equidistant samples.)
* Sign: a query inside a grid cell whose 8 corners agree takes their sign; the marching-cubes surface
  never enters such a cell, so this is exact. Queries in cells the surface crosses use the normal of
  their closest triangle (exact when the closest point is inside that triangle) and, when the closest
  point lies on an edge or a vertex, the winding number of the watertight mesh.
"""
from __future__ import annotations

import numpy as np
import trimesh

from data_pipeline.preprocess.closest_point import ClosestPoints
from data_pipeline.preprocess.mesh_queries import WindingNumbers
from data_pipeline.preprocess.watertight import GRID_HALF_EXTENT, SignedGrid

FACE_INTERIOR_MARGIN = 1e-6   # barycentric margin under which a closest point counts as on an edge


class SdfLabeller:
    """``labeller(xyz) -> sdf`` for float [n, 3] points in normalised space."""

    def __init__(self, watertight: trimesh.Trimesh, grid: SignedGrid) -> None:
        self.V = np.ascontiguousarray(watertight.vertices, dtype=np.float64)
        self.F = np.ascontiguousarray(watertight.faces, dtype=np.int64)
        self.face_normals = np.asarray(watertight.face_normals)
        self.watertight = watertight   # its vertex normals (trimesh caches them) for edge/vertex signs
        self.grid = grid
        self.closest_points = ClosestPoints(self.V, self.F)   # built once, queried for every point set
        self._winding = None       # WindingNumbers, built on the first sign query that needs one
        # The marching-cubes surface passes through every crossed cell: within one cell diagonal.
        self._crossed_radius = np.sqrt(3) * grid.voxel

    def __call__(self, xyz: np.ndarray) -> np.ndarray:
        xyz = np.ascontiguousarray(xyz, dtype=np.float64)
        inside = self._grid_sign(xyz)
        crossed = np.isnan(inside)
        radius = np.where(crossed, self._crossed_radius, np.inf)
        distance, closest_face, closest_point = self.closest_points.query(xyz, radius)
        inside[crossed] = self._closest_face_sign(xyz[crossed], closest_face[crossed], closest_point[crossed])
        return np.where(inside > 0.5, -distance, distance)

    def distance(self, xyz: np.ndarray) -> np.ndarray:
        """float [n]: unsigned distance to the watertight surface."""
        return self.closest_points.query(xyz)[0]

    def inside(self, xyz: np.ndarray) -> np.ndarray:
        """bool [n]: occupancy (sdf < 0): the grid's sign, the closest triangle's where a cell is crossed."""
        xyz = np.ascontiguousarray(xyz, dtype=np.float64)
        inside = self._grid_sign(xyz)
        crossed = np.nonzero(np.isnan(inside))[0]
        _, face, point = self.closest_points.query(xyz[crossed], np.full(len(crossed), self._crossed_radius))
        inside[crossed] = self._closest_face_sign(xyz[crossed], face, point)
        return inside > 0.5

    def closest(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Closest watertight face [n] and point [n, 3] (the labeller's tree, not a new one)."""
        _, face, point = self.closest_points.query(xyz)
        return face, point

    def _grid_sign(self, xyz: np.ndarray) -> np.ndarray:
        """float [n]: 1 inside, 0 outside, NaN where the query's grid cell has corners of both signs."""
        R = self.grid.resolution
        cell = np.clip(np.floor((xyz + GRID_HALF_EXTENT) / self.grid.voxel).astype(np.int64), 0, R - 1)
        corner_inside = [self.grid.field[cell[:, 0] + a, cell[:, 1] + b, cell[:, 2] + c] < 0
                         for a in (0, 1) for b in (0, 1) for c in (0, 1)]
        all_in = np.logical_and.reduce(corner_inside)
        any_in = np.logical_or.reduce(corner_inside)
        out = all_in.astype(np.float64)
        out[any_in & ~all_in] = np.nan
        outside_box = (np.abs(xyz) > GRID_HALF_EXTENT).any(axis=1)   # the grid border is outside
        out[outside_box] = 0.0
        return out

    def _closest_face_sign(self, xyz, face, point) -> np.ndarray:
        """1 inside / 0 outside from the closest triangle's normal, winding number where that is unsafe."""
        if len(xyz) == 0:
            return np.zeros(0)
        tri = self.V[self.F[face]]
        bary = trimesh.triangles.points_to_barycentric(tri, point)
        interior = (bary > FACE_INTERIOR_MARGIN).all(axis=1)
        along_normal = np.einsum("ij,ij->i", xyz - point, self.face_normals[face])
        result = (along_normal < 0).astype(np.float64)
        unsafe = np.nonzero(~interior | (along_normal == 0))[0]
        if len(unsafe):
            result[unsafe] = self._feature_sign(xyz[unsafe], face[unsafe], point[unsafe], bary[unsafe])
            left = unsafe[np.isnan(result[unsafe])]
            if len(left):
                result[left] = self._winding_inside(xyz[left])
        return result

    def _feature_sign(self, xyz, face, point, bary) -> np.ndarray:
        """1 inside / 0 outside for queries whose closest point lies on an edge or a vertex of ``face``:
        the sign of (query - point) against the edge's normal (sum of its two faces' normals) or the
        vertex's angle-weighted normal, exact on a closed, consistently oriented 2-manifold (the
        marching-cubes mesh; Baerentzen & Aanaes 2005). NaN where that cannot decide (an edge without
        exactly one opposite face, or a query on the tangent plane): the winding number does."""
        on = bary > FACE_INTERIOR_MARGIN                       # [n, 3] corners the point is away from
        normal = np.full((len(xyz), 3), np.nan)
        vertex = on.sum(axis=1) == 1
        corner = self.F[face[vertex], np.argmax(bary[vertex], axis=1)]
        normal[vertex] = self.watertight.vertex_normals[corner]   # angle-weighted (trimesh), cached
        edge = np.nonzero(on.sum(axis=1) == 2)[0]
        opposite = np.argmin(bary[edge], axis=1)               # the corner off the edge
        a = self.F[face[edge], (opposite + 1) % 3]
        b = self.F[face[edge], (opposite + 2) % 3]
        twin = self._face_with_edge(b, a)                       # the other face runs the edge b -> a
        found = twin >= 0
        normal[edge[found]] = self.face_normals[face[edge[found]]] + self.face_normals[twin[found]]
        along = np.einsum("ij,ij->i", xyz - point, normal)
        return np.where(np.isnan(along) | (along == 0), np.nan, (along < 0).astype(np.float64))

    def _face_with_edge(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """int [n]: the one face with the directed edge start -> end, -1 where none or several."""
        if len(start) == 0:
            return np.zeros(0, dtype=np.int64)
        touching = np.nonzero(np.isin(self.F, np.unique(start), kind="table").any(axis=1))[0]
        n = len(self.V)
        keys = (self.F[touching] * n + self.F[touching][:, [1, 2, 0]]).ravel()   # directed edges of those faces
        order = np.argsort(keys, kind="stable")
        keys, owner = keys[order], np.repeat(touching, 3)[order]
        wanted = start * n + end
        first = np.searchsorted(keys, wanted, side="left")
        count = np.searchsorted(keys, wanted, side="right") - first
        return np.where(count == 1, owner[np.minimum(first, len(owner) - 1)], -1)

    def _winding_inside(self, xyz: np.ndarray) -> np.ndarray:
        if self._winding is None:   # built once for all point sets (closed mesh: w is 0 or 1)
            self._winding = WindingNumbers(self.V, self.F)
        return (self._winding(xyz) > 0.5).astype(np.float64)

