"""Watertight conversion: any triangle soup in [-0.95, 0.95]^3 -> a closed, outward-oriented mesh.

Method (winding-number solid + narrow band + marching cubes):

* inside/outside comes from the generalised winding number |w| > 1/2 (igl's fast winding number), so
  open, multi-part, self-intersecting and inverted inputs get a sensible solid and a wide hole is
  capped by the w = 1/2 surface instead of leaking (a flood fill from outside would leave a hollow shell);
* w is evaluated everywhere only on a coarse grid and then refined by doubling: a finer grid point
  is evaluated again only where its parent cell is near the surface or has corners of both signs;
  every other point copies the sign of its uniform parent cell;
* unsigned distances (fcpw, float32: ClosestPoints.nearest) are computed only on the corners of the
  cells the surface touches, then on every corner of every cell the zero level crosses that still
  lacks one (_complete_crossed_cells), so marching cubes reads exact values only; elsewhere the field
  is +-2 voxels;
* open sheets (|w| close to 1/2 right next to the surface) get a thin shell |d| < eps so they survive;
* coarse cells with a corner whose |w| is ambiguous (inside ``sheet_winding``) are refined with a winding
  number at every finer point: away from the surface w can cross 1/2 (a hole cap), so copying a
  neighbour's sign there would leave axis-aligned slabs. If such cells fill more than
  ``ambiguous_volume`` of the grid (open panel assemblies, flat sheets), the winding method gives up
  with :class:`AmbiguousWindingError` and the caller uses the ``shell`` method instead;
* ``method="shell"``: the solid is the eps-shell {d < eps} around the input plus every region the
  shell encloses (flood fill of {d >= eps} from the grid border); exact distances on the band only;
* scikit-image marching cubes extracts the zero level set of that signed field.

:func:`signed_grid` with ``dense=True`` is the dense-grid baseline of the benchmark: the same field
with distance and winding number computed at every grid point.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import trimesh
from scipy import ndimage
from skimage.measure import marching_cubes

from data_pipeline.preprocess.config import WatertightConfig
from data_pipeline.preprocess.mesh_queries import MeshQueries

GRID_HALF_EXTENT = 1.0   # the grid spans [-1, 1]^3; normalised meshes lie in [-0.95, 0.95]^3
FIELD_CLIP_VOXELS = 2    # the field is clipped to +-2 voxels (a crossed edge's ends lie within 1 voxel + eps)
COMPLETION_ROUNDS = 4    # passes of _complete_crossed_cells (1-2 are needed on real meshes)
SURFACE_SAMPLES_PER_VOXEL = 4  # density of the samples that mark the cells the surface passes through


class WatertightError(ValueError):
    """The conversion produced no solid (the message says why)."""


class AmbiguousWindingError(WatertightError):
    """The winding number is ambiguous over too large a volume for the winding method."""


@dataclass
class SignedGrid:
    field: np.ndarray         # float32 [R+1, R+1, R+1], negative inside, exact distance inside the band
    resolution: int           # R cells per axis; voxel = 2 / R
    band_points: int          # grid points of the finest level with an exact distance
    winding_evaluations: int  # winding numbers computed over all levels
    distance_evaluations: int
    method: str = "winding"   # "winding" or "shell"
    ambiguous_volume: float = 0.0  # fraction of coarse cells with an ambiguous |w| corner (winding method)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def voxel(self) -> float:
        return 2 * GRID_HALF_EXTENT / self.resolution


@dataclass
class WatertightResult:
    mesh: trimesh.Trimesh     # closed, outward-oriented, in normalised space
    grid: SignedGrid


def make_watertight(mesh: trimesh.Trimesh, cfg: WatertightConfig, dense: bool = False,
                   method: str = "winding", queries: MeshQueries | None = None) -> WatertightResult:
    """Convert a normalised mesh into a watertight one at ``cfg.resolution`` (``queries``: reuse the
    input's search structures across methods)."""
    grid = signed_grid(mesh, cfg, dense=dense, method=method, queries=queries)
    start = time.perf_counter()
    closed = extract_surface(grid)
    grid.timings["marching_cubes"] = time.perf_counter() - start
    return WatertightResult(mesh=closed, grid=grid)


# ---------------------------------------------------------------------------
# the signed field
# ---------------------------------------------------------------------------

def signed_grid(mesh: trimesh.Trimesh, cfg: WatertightConfig, dense: bool = False, method: str = "winding",
                queries: MeshQueries | None = None) -> SignedGrid:
    if method not in ("winding", "shell"):
        raise ValueError(f"unknown watertight method {method!r} (winding or shell)")
    R = cfg.resolution
    voxel = 2 * GRID_HALF_EXTENT / R
    eps = cfg.shell_voxels * voxel
    queries = queries or MeshQueries(mesh, cfg.sheet_winding)
    timings: dict[str, float] = {}
    if method == "shell":
        return _shell_grid(mesh, cfg, queries, timings)
    ambiguous = 0.0
    if dense:
        start = time.perf_counter()
        inside, exact = _inside_dense(queries, R)
        timings["dense_field"] = time.perf_counter() - start
    else:
        start = time.perf_counter()
        near_cells = _cells_touching_surface(mesh, R)
        band = _cell_corners(_dilate(near_cells, cfg.band_voxels))
        timings["band"] = time.perf_counter() - start
        start = time.perf_counter()
        inside, exact, ambiguous, wind_anywhere = _inside_by_refinement(queries, near_cells, band, cfg, eps)
        timings["sign_and_distance"] = time.perf_counter() - start

    far = FIELD_CLIP_VOXELS * voxel
    grid = np.where(inside, np.float32(-far), np.float32(far))   # float32 throughout: [R+1]^3 is 17M points
    _confirm_sheets(exact, queries, cfg.sheet_winding, voxel)
    grid[exact.index] = np.clip(_band_values(exact, inside[exact.index], eps, cfg.sheet_winding), -far, far)
    _set_border(grid, far)
    _clamp_tiny(grid, voxel, exact.index)
    if not dense:
        exact = _complete_crossed_cells(grid, inside, exact, queries, cfg, eps, far, wind_anywhere)
    return SignedGrid(field=grid, resolution=R, band_points=len(exact.distance),
                      winding_evaluations=queries.winding_count, distance_evaluations=queries.distance_count,
                      ambiguous_volume=ambiguous, timings=timings)


def _shell_grid(mesh: trimesh.Trimesh, cfg: WatertightConfig, queries: MeshQueries, timings: dict) -> SignedGrid:
    """Field of the eps-shell method: d - eps in the band; off the band (d >= one band width >= eps)
    outside if reachable from the grid border through {d >= eps}, else an enclosed cavity (inside)."""
    R = cfg.resolution
    voxel = 2 * GRID_HALF_EXTENT / R
    eps = cfg.shell_voxels * voxel
    start = time.perf_counter()
    # One voxel beyond the shell: the field is exact on both sides of the zero level.
    band = _cell_corners(_dilate(_cells_touching_surface(mesh, R), max(cfg.band_voxels, int(np.ceil(cfg.shell_voxels)) + 1)))
    exact = _ExactPoints(np.nonzero(band), R)
    exact.distance, exact.face = queries.distance(exact.xyz)
    timings["band"] = time.perf_counter() - start
    start = time.perf_counter()
    far = 2 * eps + voxel
    free = np.ones(band.shape, dtype=bool)
    free[exact.index] = exact.distance >= eps
    inside = ~_reachable_from_border(free)
    grid = np.where(inside, -far, far).astype(np.float32)
    values = exact.distance - eps                 # > 0 off the shell ...
    cavity = inside[exact.index] & (values >= 0)
    values[cavity] = -values[cavity]              # ... except in an enclosed cavity, which is inside
    grid[exact.index] = np.clip(values, -far, far)
    _set_border(grid, far)
    _clamp_tiny(grid, voxel, exact.index)
    timings["flood_fill"] = time.perf_counter() - start
    return SignedGrid(field=grid, resolution=R, band_points=len(exact.distance), winding_evaluations=0,
                      distance_evaluations=queries.distance_count, method="shell", timings=timings)


def _reachable_from_border(free: np.ndarray) -> np.ndarray:
    """bool like ``free``: free points 6-connected to a free point on the grid border."""
    labels, count = ndimage.label(free)
    border = np.concatenate([labels[(slice(None),) * a + (end,)].ravel() for a in range(3) for end in (0, -1)])
    outside = np.zeros(count + 1, dtype=bool)
    outside[border] = True
    outside[0] = False      # label 0: not free
    return outside[labels]


def _inside_dense(queries: MeshQueries, R: int) -> tuple[np.ndarray, _ExactPoints]:
    """The baseline: distance and winding number at every grid point."""
    axis = np.arange(R + 1)
    exact = _ExactPoints(np.meshgrid(axis, axis, axis, indexing="ij"), R)
    exact.distance, exact.face = queries.distance(exact.xyz)
    exact.abs_winding = np.abs(queries.winding(exact.xyz))
    return (exact.abs_winding > 0.5).reshape((R + 1,) * 3), exact


class _ExactPoints:
    """Grid points of the finest level with an exact distance (and |w| where it was needed, else NaN)."""

    def __init__(self, index, R: int) -> None:
        self.index = tuple(np.asarray(i).reshape(-1) for i in index)
        self.xyz = _grid_points(self.index, R)
        self.distance = np.zeros(len(self.xyz))
        self.face = np.zeros(len(self.xyz), dtype=np.int64)     # closest input face
        self.abs_winding = np.full(len(self.xyz), np.nan)

    def merged(self, other: _ExactPoints) -> _ExactPoints:
        """Both point sets in one (same resolution)."""
        out = _ExactPoints.__new__(_ExactPoints)
        out.index = tuple(np.concatenate(pair) for pair in zip(self.index, other.index))
        for name in ("xyz", "distance", "face", "abs_winding"):
            setattr(out, name, np.concatenate([getattr(self, name), getattr(other, name)]))
        return out


def _confirm_sheets(exact: _ExactPoints, queries: MeshQueries, sheet_winding, voxel: float) -> None:
    """A grid point lying (almost) on a closed surface also has |w| = 1/2. Such points count as an
    open sheet only if |w| stays near 1/2 half a voxel to both sides of their closest face."""
    lo, hi = sheet_winding
    with np.errstate(invalid="ignore"):
        suspect = np.nonzero((exact.abs_winding > lo) & (exact.abs_winding < hi) & (exact.distance < 0.25 * voxel))[0]
    if len(suspect) == 0:
        return
    offset = 0.5 * voxel * queries.face_normals(exact.face[suspect])
    sides = np.abs(queries.winding(np.concatenate([exact.xyz[suspect] + offset, exact.xyz[suspect] - offset])))
    front, back = sides[:len(suspect)], sides[len(suspect):]
    closed = ~((front > lo) & (front < hi) & (back > lo) & (back < hi))
    exact.abs_winding[suspect[closed]] = np.maximum(front, back)[closed]   # the inside side's value


def _band_values(exact: _ExactPoints, inside: np.ndarray, eps: float, sheet_winding) -> np.ndarray:
    """Signed distance at the exact points; open sheets (|w| near 1/2) get a shell of half-thickness eps."""
    values = np.where(inside, -exact.distance, exact.distance)
    lo, hi = sheet_winding
    with np.errstate(invalid="ignore"):
        sheet = (exact.abs_winding > lo) & (exact.abs_winding < hi)
    values[sheet] = np.minimum(values[sheet], exact.distance[sheet] - eps)
    return values


def _set_border(grid: np.ndarray, far: float) -> None:
    """Grid border outside, so the surface closes."""
    for axis in range(3):
        index = [slice(None)] * 3
        for end in (0, -1):
            index[axis] = end
            grid[tuple(index)] = far


def _clamp_tiny(grid: np.ndarray, voxel: float, band: tuple[np.ndarray, ...]) -> None:
    """No values within 1e-4 voxel of zero: a grid point on the surface would give several coincident
    marching-cubes vertices (degenerate, non-manifold triangles). Only the ``band`` points (index
    arrays) hold values other than +-far."""
    tiny = np.float32(1e-4 * voxel)
    small = np.abs(grid[band]) < tiny
    grid[tuple(i[small] for i in band)] = tiny


def _corners_any_all(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bool [R+1]^3 points -> (any, all) over each cell's 8 corners, bool [R]^3 each (separable: pairs
    along one axis at a time, 6 passes instead of 16)."""
    any_of, all_of = points, points
    for axis in range(3):
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        any_of = any_of[tuple(lo)] | any_of[tuple(hi)]
        all_of = all_of[tuple(lo)] & all_of[tuple(hi)]
    return any_of, all_of


def _crossed_cells(negative: np.ndarray) -> np.ndarray:
    """bool [R]^3: cells whose 8 corners (bool [R+1]^3) do not all agree."""
    any_negative, all_negative = _corners_any_all(negative)
    return any_negative & ~all_negative


def _complete_crossed_cells(grid: np.ndarray, inside: np.ndarray, exact: _ExactPoints, queries: MeshQueries,
                            cfg: WatertightConfig, eps: float, far: float, wind_anywhere: np.ndarray | None) -> _ExactPoints:
    """Give every corner of every cell the zero level crosses its exact value, so marching cubes never
    interpolates a clipped +-far. The exact band covers the corners of the cells the surface samples
    touch; a cell the surface only clips (or an open sheet's shell one voxel out) can be missed. Such
    corners get their distance and, like the band's points (within a voxel of the input, or anywhere in
    ``wind_anywhere``), their winding number: |w| marks open sheets and, within a voxel, decides the
    sign, which may correct a sign copied across that missed cell. Repeated while that changes the
    crossed cells."""
    R = grid.shape[0] - 1
    voxel = 2 * GRID_HALF_EXTENT / R
    known = np.zeros(grid.shape, dtype=bool)
    known[exact.index] = True
    for _ in range(COMPLETION_ROUNDS):
        missing = _cell_corners(_crossed_cells(grid < 0)) & ~known
        if not missing.any():
            break
        before = grid[missing] < 0
        extra = _ExactPoints(np.nonzero(missing), R)
        extra.distance, extra.face = queries.distance(extra.xyz)
        close = extra.distance <= max(voxel, eps)
        wind = close if wind_anywhere is None else close | wind_anywhere[extra.index]
        extra.abs_winding[wind] = np.abs(queries.winding(extra.xyz[wind]))
        inside[extra.index] = np.where(close, extra.abs_winding > 0.5, inside[extra.index])
        _confirm_sheets(extra, queries, cfg.sheet_winding, voxel)
        grid[extra.index] = np.clip(_band_values(extra, inside[extra.index], eps, cfg.sheet_winding), -far, far)
        _set_border(grid, far)
        _clamp_tiny(grid, voxel, extra.index)
        known[extra.index] = True
        exact = exact.merged(extra)
        if ((grid[extra.index] < 0) == before).all():   # no sign changed: the crossed cells are the same
            break
    return exact


def _grid_points(index: tuple[np.ndarray, ...], R: int) -> np.ndarray:
    """Integer grid indices (tuple of 3 arrays) -> float64 [n, 3] coordinates in [-1, 1]."""
    voxel = 2 * GRID_HALF_EXTENT / R
    return np.stack(index, axis=1).astype(np.float64) * voxel - GRID_HALF_EXTENT


def _cells_touching_surface(mesh: trimesh.Trimesh, R: int) -> np.ndarray:
    """bool [R, R, R]: cells that contain a point of the surface (random samples, SURFACE_SAMPLES_PER_VOXEL
    per voxel face area, plus every vertex; the band dilation covers the rare gap between samples)."""
    voxel = 2 * GRID_HALF_EXTENT / R
    count = int(np.ceil(SURFACE_SAMPLES_PER_VOXEL * mesh.area / voxel ** 2))
    points, _ = trimesh.sample.sample_surface(mesh, count, seed=0)
    points = np.concatenate([points, mesh.vertices])
    cell = np.clip(((points + GRID_HALF_EXTENT) / voxel).astype(np.int64), 0, R - 1)
    near = np.zeros((R,) * 3, dtype=bool)
    near[cell[:, 0], cell[:, 1], cell[:, 2]] = True
    return near


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation by a (2*steps+1)^3 cube, done as separable shifts (much faster than ndimage here)."""
    out = mask.copy()
    for axis in range(3):
        for _ in range(steps):
            grown = out.copy()
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(0, -1), slice(1, None)
            grown[tuple(lo)] |= out[tuple(hi)]
            grown[tuple(hi)] |= out[tuple(lo)]
            out = grown
    return out


def _cell_corners(cells: np.ndarray) -> np.ndarray:
    """bool [R, R, R] cells -> bool [R+1, R+1, R+1]: every corner of a marked cell (one axis at a time)."""
    points = cells
    for axis in range(3):
        shape = list(points.shape)
        shape[axis] += 1
        grown = np.zeros(shape, dtype=bool)
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        grown[tuple(lo)] = points
        grown[tuple(hi)] |= points
        points = grown
    return points


def _pool(cells: np.ndarray, factor: int) -> np.ndarray:
    """bool [R, R, R] -> bool [R/f, R/f, R/f]: a coarse cell is marked if any fine cell in it is
    (halving one axis at a time: strided ORs, ~10x faster than a reshaped any() on 256^3)."""
    while factor > 1:
        for axis in range(3):
            even, odd = [slice(None)] * 3, [slice(None)] * 3
            even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
            cells = cells[tuple(even)] | cells[tuple(odd)]
        factor //= 2
    return cells


def _inside_by_refinement(queries: MeshQueries, near_cells: np.ndarray, band: np.ndarray, cfg: WatertightConfig,
                          eps: float) -> tuple[np.ndarray, _ExactPoints, float, np.ndarray | None]:
    """bool [R+1]^3 inside mask, the finest-level points with exact distances (band included), the
    ambiguous volume fraction, and the points whose |w| is computed at any distance from the surface
    (bool [R+1]^3: uncertain cells, or all when the coarse level is the finest; None: none). Raises
    AmbiguousWindingError when that fraction is too large."""
    R = near_cells.shape[0]
    r = min(cfg.coarse_resolution, R)
    axis = np.arange(r + 1)
    coarse = np.meshgrid(axis, axis, axis, indexing="ij")
    abs_w = np.abs(queries.winding(_grid_points(tuple(c.reshape(-1) for c in coarse), r))).reshape((r + 1,) * 3)
    # Next to the surface |w| passes 1/2 anyway; the distance rule of _refine handles those cells.
    uncertain = _ambiguous_cells(abs_w, cfg.sheet_winding) & ~_dilate(_pool(near_cells, R // r), 1)
    ambiguous = float(uncertain.mean())
    if ambiguous > cfg.ambiguous_volume:
        raise AmbiguousWindingError(f"winding number ambiguous over {ambiguous:.1%} of the volume")
    inside = abs_w > 0.5
    exact = None
    while r < R:
        finest = 2 * r == R
        # Cells without surface and with unambiguous corners have a smooth w far from 1/2: agreeing
        # corners decide them. Uncertain cells get a winding number at every finer point.
        inside, exact = _refine(inside, _pool(near_cells, R // r), _blocks(uncertain, r // len(uncertain)), queries,
                                band if finest else None, eps if finest else 0.0)
        r *= 2
    if exact is None:  # coarse level == finest level: everything was evaluated
        exact = _ExactPoints(np.nonzero(band), R)
        exact.distance, exact.face = queries.distance(exact.xyz)
        exact.abs_winding = np.abs(queries.winding(exact.xyz))
        return inside, exact, ambiguous, np.ones(band.shape, dtype=bool)
    wind_anywhere = _cell_corners(_blocks(uncertain, R // len(uncertain))) if uncertain.any() else None
    return inside, exact, ambiguous, wind_anywhere


def _ambiguous_cells(abs_w: np.ndarray, sheet_winding) -> np.ndarray:
    """bool [r]^3: cells with a corner whose |w| [r+1]^3 lies strictly inside the sheet range."""
    lo, hi = sheet_winding
    return _corners_any_all((abs_w > lo) & (abs_w < hi))[0]


def _blocks(cells: np.ndarray, factor: int) -> np.ndarray:
    """bool [r]^3 cells -> bool [factor r]^3: each cell copied to its factor^3 sub-cells (the other direction of _pool)."""
    return cells.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)


def _upsample(cells: np.ndarray) -> np.ndarray:
    """bool [r]^3 cells -> [2r+1]^3 fine points, each taking its parent cell min(i // 2, r - 1)
    (repeats: several times faster than fancy indexing on 17M points)."""
    out = cells
    for axis in range(3):
        out = np.repeat(out, 2, axis=axis)
        out = np.concatenate([out, np.take(out, [-1], axis=axis)], axis=axis)
    return out


def _refine(inside_c: np.ndarray, near_c: np.ndarray, uncertain_c: np.ndarray, queries: MeshQueries, band, eps: float):
    """Inside mask on a grid twice as fine.

    New points whose parent cell has agreeing corners, no surface and no ambiguous corner copy that
    sign. In the other cells every point p gets its exact distance d(p) (cheap near the surface).
    Points are then settled by their number k of odd indices (k = 1, 2, 3): the neighbour q = p minus
    one voxel along its first odd axis has k - 1 odd indices and is already settled; if d(p) > |p - q|
    = one voxel, no surface lies between them and p takes q's sign, unless p lies in an uncertain cell
    (w may cross 1/2 off the surface there). Only points closer to the surface than one voxel or in
    uncertain cells get their own winding number, the expensive query.
    """
    r = near_c.shape[0]
    any_in, all_in = _corners_any_all(inside_c)
    ambiguous_cell = near_c | (any_in & ~all_in) | uncertain_c

    inside = _upsample(all_in)
    ask = _upsample(ambiguous_cell)
    inside[::2, ::2, ::2] = inside_c
    ask[::2, ::2, ::2] = False
    if band is not None:
        ask |= band
    exact = _ExactPoints(np.nonzero(ask), 2 * r)
    exact.distance, exact.face = queries.distance(exact.xyz)
    voxel = GRID_HALF_EXTENT / r
    index = np.stack(exact.index, axis=1)
    odd = index & 1
    odd_count = odd.sum(axis=1)
    # Which points need a winding number does not depend on any sign: ask for all in one call
    # (each call rebuilds igl's tree). Coarse points (k = 0) keep their sign; their |w| only
    # serves to detect open sheets.
    cell = np.minimum(index >> 1, r - 1)
    in_uncertain = uncertain_c[cell[:, 0], cell[:, 1], cell[:, 2]] & (odd_count > 0)
    need = (exact.distance <= np.where(odd_count == 0, eps, max(voxel, eps))) | in_uncertain
    exact.abs_winding[need] = np.abs(queries.winding(exact.xyz[need]))
    first_odd = np.argmax(odd, axis=1)
    for k in (1, 2, 3):
        group = np.nonzero(odd_count == k)[0]
        asked, settled = group[need[group]], group[~need[group]]
        inside[tuple(index[asked].T)] = exact.abs_winding[asked] > 0.5
        neighbour = index[settled].copy()
        neighbour[np.arange(len(settled)), first_odd[settled]] -= 1
        inside[tuple(index[settled].T)] = inside[tuple(neighbour.T)]
    return inside, exact


# ---------------------------------------------------------------------------
# marching cubes
# ---------------------------------------------------------------------------

def extract_surface(grid: SignedGrid) -> trimesh.Trimesh:
    """Zero level set of the field as a closed mesh with outward normals."""
    if grid.field.min() >= 0:
        raise WatertightError("watertight conversion found no inside: the mesh encloses no volume")
    voxel = grid.voxel
    verts, faces, _, _ = marching_cubes(grid.field, level=0.0, spacing=(voxel,) * 3, allow_degenerate=False)
    # process=False: scikit-image already shares vertices, and trimesh's tolerance merge would
    # collapse vertices a hair apart into degenerate, non-manifold faces.
    mesh = trimesh.Trimesh(vertices=verts - GRID_HALF_EXTENT, faces=faces, process=False)
    if signed_volume(mesh) < 0:
        mesh.invert()
    return mesh


def signed_volume(mesh: trimesh.Trimesh) -> float:
    """Divergence-theorem volume (cheaper than trimesh's full mass properties)."""
    a, b, c = (mesh.vertices[mesh.faces[:, k]] for k in range(3))
    return float(np.einsum("ij,ij->", a, np.cross(b, c)) / 6)
