"""Shard schema v2 (v1 + condition views): the contract between preprocessing (writer) and the loader (reader).

One WebDataset sample per input mesh. Coordinates are stored as uint16 over
[-COORD_RANGE, COORD_RANGE] (step 2*1.05/65535 = 3.2e-5), unit normals as int8
(x127), SDF values as float16 (negative inside). See docs/data.md.
"""
from __future__ import annotations

import numpy as np
import xxhash

SCHEMA_VERSION = 2                     # 2 = 1 + condition views (view_{i}.png, json "views")
READABLE_SCHEMA_VERSIONS = (1, 2)
MAX_VIEWS = 64                         # view_0.png .. view_63.png at most
COORD_RANGE = 1.05                     # quantisation box and volume-query box: [-1.05, 1.05]^3
NORMALISED_HALF_EXTENT = 0.95          # longest bbox side maps to [-0.95, 0.95]
COORD_LEVELS = np.iinfo(np.uint16).max  # 65535 steps
COORD_STEP = 2 * COORD_RANGE / COORD_LEVELS
NORMAL_SCALE = 127

# key -> (dtype, meaning); "npy" keys are stored with numpy's .npy encoding.
ARRAY_KEYS: dict[str, tuple[str, str]] = {
    "surface.npy": ("uint16", "[N,3] uniform surface points"),
    "surface_normal.npy": ("int8", "[N,3] their unit normals x127"),
    "surface_fps.npy": ("int32", "[K] farthest-point order into surface (prefix-stable)"),
    "sharp.npy": ("uint16", "[M,3] sharp-edge points (M may be 0)"),
    "sharp_normal.npy": ("int8", "[M,3] their normals x127"),
    "sharp_fps.npy": ("int32", "[K'] farthest-point order into sharp"),
    "vol.npy": ("uint16", "[P,3] uniform volume queries"),
    "vol_sdf.npy": ("float16", "[P] SDF of vol"),
    "near.npy": ("uint16", "[Q,3] near-surface queries"),
    "near_sdf.npy": ("float16", "[Q] SDF of near"),
    "sharp_near.npy": ("uint16", "[S,3] queries near sharp points (optional)"),
    "sharp_near_sdf.npy": ("float16", "[S] SDF of sharp_near (optional)"),
    "occ.npy": ("uint8", "[R^3/8] np.packbits of the R^3 occupancy grid, C order (x, y, z)"),
}
OPTIONAL_KEYS = ("sharp_near.npy", "sharp_near_sdf.npy")
# json key: member name -> 64-bit XXH3 of its bytes, for every member but the json itself (written by
# preprocessing since pipeline version preprocess-5; older shards have none and still load). XXH3 is
# chosen over zlib's CRC32 because readers verify every member they read: CRC32 (~0.4 GB/s) cost
# 36-80% of the loader's read + decode CPU, XXH3 is several times cheaper (docs/benchmarks.md).
CHECKSUM_KEY = "xxh3_64"


def checksum(data: bytes) -> int:
    """The checksum preprocessing records for one member's bytes."""
    return xxhash.xxh3_64_intdigest(data)


def damaged_members(members: dict[str, bytes], meta: dict) -> list[str] | None:
    """Names of members whose bytes do not match the checksum recorded in the sample's json (``meta``);
    None when the json records no checksums. Only members present in ``members`` are checked (a
    reader may skip members it does not use); a recorded member that is present but empty counts."""
    recorded = meta.get(CHECKSUM_KEY)
    if not isinstance(recorded, dict):
        return None
    return sorted(name for name, value in recorded.items() if name in members and checksum(members[name]) != value)


def quantize_coords(xyz: np.ndarray) -> np.ndarray:
    """float [..., 3] in normalised space -> uint16; values outside the box are clamped."""
    x = np.clip(np.asarray(xyz, dtype=np.float64), -COORD_RANGE, COORD_RANGE)
    return np.rint((x + COORD_RANGE) / COORD_STEP).astype(np.uint16)


def dequantize_coords(q: np.ndarray) -> np.ndarray:
    """uint16 [..., 3] -> float32 in normalised space."""
    return (q.astype(np.float32) * np.float32(COORD_STEP) - np.float32(COORD_RANGE)).astype(np.float32)


def quantize_normals(n: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(n, dtype=np.float64) * NORMAL_SCALE), -127, 127).astype(np.int8)


def dequantize_normals(q: np.ndarray) -> np.ndarray:
    """int8 [..., 3] -> float32 unit vectors (renormalised after rounding)."""
    n = q.astype(np.float32) / NORMAL_SCALE
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-8)


def pack_occupancy(occ: np.ndarray) -> np.ndarray:
    """bool [R, R, R] (axes x, y, z) -> uint8 [R^3/8]."""
    return np.packbits(np.asarray(occ, dtype=bool).reshape(-1))


def unpack_occupancy(packed: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [R^3/8] -> bool [R, R, R]."""
    bits = np.unpackbits(packed, count=resolution ** 3)
    return bits.astype(bool).reshape(resolution, resolution, resolution)


def occupancy_grid_centers(resolution: int) -> np.ndarray:
    """float32 [R, R, R, 3] cell centres of the occupancy grid over [-COORD_RANGE, COORD_RANGE]^3."""
    edge = (np.arange(resolution, dtype=np.float64) + 0.5) / resolution * 2 * COORD_RANGE - COORD_RANGE
    grid = np.stack(np.meshgrid(edge, edge, edge, indexing="ij"), axis=-1)
    return grid.astype(np.float32)


def view_key(index: int) -> str:
    """Tar member suffix of condition view ``index``: RGBA PNG, alpha = coverage (schema v2)."""
    return f"view_{index}.png"


VIEW_KEYS = tuple(view_key(i) for i in range(MAX_VIEWS))
