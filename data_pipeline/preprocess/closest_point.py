"""Closest points on a triangle mesh for many queries: fcpw's vectorised float32 BVH, 1.5-2x fewer CPU
seconds than igl's float64 AABB tree. Contract of the labels: docs/data.md "Label distances".

:meth:`ClosestPoints.nearest` returns fcpw's own answer (closest triangle and float32 distance): what
the watertight conversion needs, whose field is float32 anyway.

:meth:`ClosestPoints.query` adds float64: the distance and closest point on the picked triangle are
recomputed in float64 (trimesh). Where that distance differs from fcpw's float32 one by more than
RECHECK (trimesh's closest point is wrong on sliver triangles: 4.5e-5 seen on a marching-cubes sliver),
the query is answered by igl's float64 search over the triangles fcpw picked for those queries
(a handful, so no tree over the whole mesh is built).

Bound of ``query``: d_exact <= d <= d_exact + 2 * FLOAT32_DISTANCE_ERROR. The lower side holds because d
is a float64 distance to a real triangle; the upper follows when each float32 distance fcpw compares is
within FLOAT32_DISTANCE_ERROR of its float64 value, an error measured (not derived): at most 4.4e-7 on
watertight marching-cubes meshes, 2.2e-6 on 14 of 15 real input meshes (featuretype.STL's long, thin CAD
triangles: 1.2e-5, which is why the labels use ``query`` on watertight meshes only).
tests/test_closest_point.py checks both sides against igl's exact float64 distances.

The search radius of each query starts at an upper bound: the distance from the query to the closest
surface points of the 8 corners of its cell in a coarse node grid (any surface point bounds the
distance from above, so this is always valid).
"""
from __future__ import annotations

import operator

import fcpw
import igl
import numpy as np
import trimesh

from data_pipeline.schema import COORD_RANGE

NODE_CELLS = 8                  # coarse node grid over [-COORD_RANGE, COORD_RANGE]^3 (9^3 node queries)
FLOAT32_DISTANCE_ERROR = 5e-6   # |float32 - float64| distance in fcpw for coordinates <= 1.05 (measured <= 2.2e-6)
RECHECK = 1e-6                  # float64 vs float32 distance to the picked triangle above this: igl's search
RADIUS_SLACK = 1e-5             # widens the seeded radius past float32 rounding of the bound itself
_FACE_AND_DISTANCE = operator.attrgetter("primitive_index", "d")
_HIT = np.dtype([("face", np.int64), ("distance", np.float64)])


MORTON_BITS = 7   # 128^3 cells over the query box for the query order


def spatial_order(xyz: np.ndarray) -> np.ndarray:
    """int64 [n]: argsort of the points [n, 3] along a Morton (Z-order) curve."""
    cell = np.clip(((xyz + 1.1) / 2.2 * (1 << MORTON_BITS)).astype(np.int64), 0, (1 << MORTON_BITS) - 1)
    key = np.zeros(len(xyz), dtype=np.int64)
    for bit in range(MORTON_BITS):
        for axis in range(3):
            key |= ((cell[:, axis] >> bit) & 1) << (3 * bit + axis)
    return np.argsort(key, kind="stable")


def in_spatial_order(query, xyz: np.ndarray):
    """``query(points)`` run on ``xyz`` [n, 3] in Morton order, every returned array put back in the
    caller's order. Same results; consecutive queries visit the same tree nodes (2-3x fewer CPU
    seconds than random order for scattered queries)."""
    order = spatial_order(xyz)
    out = query(np.ascontiguousarray(xyz[order], dtype=np.float64))
    return tuple(_unsort(order, a) for a in out) if isinstance(out, tuple) else _unsort(order, out)


class ClosestPoints:
    """Closest points on the triangles (V [v, 3], F [f, 3]); build once, query often."""

    def __init__(self, V: np.ndarray, F: np.ndarray) -> None:
        self.V = np.ascontiguousarray(V, dtype=np.float64)
        self.F = np.ascontiguousarray(F, dtype=np.int64)
        self.scene = fcpw.scene_3D()
        self.scene.set_object_count(1)
        self.scene.set_object_vertices(np.asfortranarray(self.V, dtype=np.float32), 0)
        self.scene.set_object_triangles(np.asfortranarray(self.F, dtype=np.int32), 0)
        self.scene.build(fcpw.aggregate_type.bvh_surface_area, True)
        self._node_points = None   # float64 [NODE_CELLS + 1]^3 x 3: closest surface point of each node

    def nearest(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32-accurate distance (float64 array) [n] and closest triangle int64 [n], in the given
        order and unseeded: for grid points (already coherent, mostly near the surface, where sorting
        and seeding cost more than they save)."""
        if len(xyz) == 0:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        face, distance = self._search(xyz, np.full(len(xyz), np.inf))
        return distance, face

    def query(self, xyz: np.ndarray, radius: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float64 distance [n] (within the bound above), closest triangle [n] and point [n, 3].
        ``radius`` [n]: a known upper bound of each distance (inf where unknown: the node grid's)."""
        if len(xyz) == 0:
            return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros((0, 3))
        order = spatial_order(xyz)          # Morton order: neighbouring queries share BVH nodes
        query = np.ascontiguousarray(xyz[order], dtype=np.float64)
        bound = np.full(len(query), np.inf) if radius is None else np.asarray(radius, dtype=np.float64)[order]
        unknown = np.isinf(bound)
        bound[unknown] = self._upper_bound(query[unknown])
        face, float32_distance = self._closest_faces(query, bound)
        point = trimesh.triangles.closest_point(self.V[self.F[face]], query)
        distance = np.linalg.norm(query - point, axis=1)
        unsafe = np.nonzero(np.abs(distance - float32_distance) > RECHECK)[0]
        if len(unsafe):
            distance[unsafe], face[unsafe], point[unsafe] = self._among_picked(query[unsafe], face[unsafe])
        return _unsort(order, distance), _unsort(order, face), _unsort(order, point)

    def _among_picked(self, query: np.ndarray, picked: np.ndarray):
        """igl's float64 search over the triangles fcpw picked for these queries (a valid, tight answer:
        each query's own picked triangle is among them)."""
        faces = np.unique(picked)
        squared, local, point = igl.point_mesh_squared_distance(query, self.V, self.F[faces])
        return np.sqrt(squared), faces[local], point

    def _closest_faces(self, query: np.ndarray, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int64 [n] closest triangle within ``radius`` (re-searched unbounded if none is found) and
        fcpw's float32 distance to it [n]."""
        face, distance = self._search(query, radius)
        missed = face < 0
        if missed.any():
            face[missed], distance[missed] = self._search(query[missed], np.full(int(missed.sum()), np.inf))
        return face, distance

    def _search(self, query: np.ndarray, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hits = fcpw.interaction_3D_list()
        squared = np.minimum(radius * (1 + RADIUS_SLACK) + RADIUS_SLACK, 1e18) ** 2
        self.scene.find_closest_points(np.asfortranarray(query, dtype=np.float32), squared.astype(np.float32), hits)
        found = np.fromiter(map(_FACE_AND_DISTANCE, hits), dtype=_HIT, count=len(query))   # one pass over the hits
        return found["face"], found["distance"]

    def _upper_bound(self, query: np.ndarray) -> np.ndarray:
        """float64 [n]: min over the 8 corners of the query's node cell of |query - closest point of corner|."""
        if self._node_points is None:
            self._node_points = self._closest_points_of_nodes()
        h = 2 * COORD_RANGE / NODE_CELLS
        cell = np.clip(np.floor((query + COORD_RANGE) / h).astype(np.int64), 0, NODE_CELLS - 1)
        bound = np.full(len(query), np.inf)
        for corner in np.ndindex(2, 2, 2):
            i, j, k = (cell + np.array(corner)).T
            bound = np.minimum(bound, np.linalg.norm(query - self._node_points[i, j, k], axis=1))
        return bound

    def _closest_points_of_nodes(self) -> np.ndarray:
        axis = np.linspace(-COORD_RANGE, COORD_RANGE, NODE_CELLS + 1)
        nodes = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
        face, _ = self._closest_faces(nodes, np.full(len(nodes), np.inf))
        points = trimesh.triangles.closest_point(self.V[self.F[face]], nodes)
        return points.reshape(NODE_CELLS + 1, NODE_CELLS + 1, NODE_CELLS + 1, 3)


def _unsort(order: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` computed on ``xyz[order]`` -> the caller's order."""
    out = np.empty_like(values)
    out[order] = values
    return out
