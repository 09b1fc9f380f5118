"""Cameras of the condition views (schema v2, design.md section 3b) and the projection that uses them.

Convention (OpenCV): camera x right, y down, z forward (into the scene). ``world_to_camera`` is a
4x4 matrix [[R, t], [0, 1]] mapping the sample's *normalised* object space to camera coordinates;
``intrinsics`` K is the 3x3 pixel matrix: u = fx*x/z + cx, v = fy*y/z + cy, where pixel (i, j)
(column i, row j) covers [i, i+1) x [j, j+1), so its centre is (i + 0.5, j + 0.5).

World "up" for placing cameras is +y (glTF's and most OBJ files' convention); elevation is measured
from the x-z plane towards +y, azimuth around +y starting at +z.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

BOX_HALF_EXTENT = 1.0     # the cameras frame [-1, 1]^3 (normalised shapes span [-0.95, 0.95])
WORLD_UP = np.array([0.0, 1.0, 0.0])
TAG_VIEWS = 0x56494557    # separates the camera generator from the sampling generators of the same id
RING_STREAM = 1 << 20     # the "view" number of the generator that turns the whole ring of a sample


@dataclass(frozen=True)
class CameraRig:
    """How the K cameras of one sample are placed (preprocess config ``render.*``)."""
    resolution: int = 518                          # square images (DINOv2: patch 14 x 37)
    fov_deg: float = 40.0                          # full field of view, horizontal = vertical
    elevation_deg: tuple[float, float] = (-10.0, 40.0)
    azimuth_jitter: float = 0.5                    # azimuth noise as a fraction of the 360/K sector

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"render.resolution must be >= 8 pixels, got {self.resolution}")
        if not 0 < self.fov_deg < 180:
            raise ValueError(f"render.fov_deg must be in (0, 180), got {self.fov_deg}")
        low, high = self.elevation_deg
        if not -90 <= low <= high <= 90:
            raise ValueError(f"render.elevation_deg must be [low, high] within [-90, 90], got {list(self.elevation_deg)}")
        if not 0 <= self.azimuth_jitter <= 1:
            raise ValueError(f"render.azimuth_jitter must be in [0, 1], got {self.azimuth_jitter}")


def framing_distance(fov_deg: float) -> float:
    """Camera distance at which the bounding sphere of [-1, 1]^3 (radius sqrt 3) fits the view cone."""
    return math.sqrt(3) * BOX_HALF_EXTENT / math.sin(math.radians(fov_deg) / 2)


def intrinsics(resolution: int, fov_deg: float) -> np.ndarray:
    """3x3 pixel matrix of a square pinhole camera with its principal point at the image centre."""
    focal = resolution / 2 / math.tan(math.radians(fov_deg) / 2)
    return np.array([[focal, 0.0, resolution / 2], [0.0, focal, resolution / 2], [0.0, 0.0, 1.0]])


def look_at(position: np.ndarray) -> np.ndarray:
    """4x4 world_to_camera of a camera at ``position`` looking at the origin, +y up in the image."""
    forward = -position / np.linalg.norm(position)
    right = np.cross(forward, WORLD_UP)
    if np.linalg.norm(right) < 1e-9:          # looking straight up or down: any right vector will do
        right = np.array([1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)           # x right, y down, z forward is right-handed
    rotation = np.stack([right, down, forward])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = -rotation @ position
    return matrix


def view_seed(seed: int, mesh_id: str, view: int) -> list[int]:
    """Seed of view ``view`` of sample ``mesh_id``: the same id always gets the same cameras."""
    return [seed, int(mesh_id[:15], 16) if _is_hex(mesh_id) else _stable_hash(mesh_id), TAG_VIEWS, view]


def sample_cameras(mesh_id: str, count: int, rig: CameraRig, seed: int = 0) -> list[dict]:
    """``count`` cameras on a sphere around the object: azimuths spread over the circle (view i in
    sector i, jittered, the whole ring turned by a per-sample offset), elevation uniform in the range.
    Returns json-ready dicts with ``intrinsics`` (3x3) and ``world_to_camera`` (4x4) as nested lists."""
    k = intrinsics(rig.resolution, rig.fov_deg)
    distance = framing_distance(rig.fov_deg)
    offset = np.random.default_rng(view_seed(seed, mesh_id, RING_STREAM)).uniform(0, 2 * math.pi)
    cameras = []
    for view in range(count):
        rng = np.random.default_rng(view_seed(seed, mesh_id, view))
        jitter = rng.uniform(-0.5, 0.5) * rig.azimuth_jitter
        azimuth = offset + (view + jitter) * 2 * math.pi / count
        elevation = math.radians(rng.uniform(*rig.elevation_deg))
        position = distance * np.array([math.cos(elevation) * math.sin(azimuth), math.sin(elevation),
                                        math.cos(elevation) * math.cos(azimuth)])
        cameras.append({"intrinsics": k.tolist(), "world_to_camera": look_at(position).tolist()})
    return cameras


def project(points: np.ndarray, intrinsics_matrix, world_to_camera) -> tuple[np.ndarray, np.ndarray]:
    """Normalised points [N, 3] -> (pixel coordinates [N, 2] as (u, v) = (column, row), continuous,
    pixel centres at integer + 0.5; depth z [N] along the camera axis, > 0 in front of the camera).

    ``intrinsics_matrix`` and ``world_to_camera`` are one entry of a sample's json ``views`` list."""
    k = np.asarray(intrinsics_matrix, dtype=np.float64)
    w2c = np.asarray(world_to_camera, dtype=np.float64)
    cam = np.asarray(points, dtype=np.float64) @ w2c[:3, :3].T + w2c[:3, 3]   # [N, 3]
    pix = cam @ k.T                                                           # [N, 3] homogeneous
    depth = cam[:, 2]
    return pix[:, :2] / depth[:, None], depth


def _is_hex(text: str) -> bool:
    return len(text) >= 1 and all(c in "0123456789abcdefABCDEF" for c in text[:15])


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())
