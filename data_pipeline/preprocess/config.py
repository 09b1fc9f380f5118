"""Typed config of ``shapeflow preprocess`` (YAML files hold only differences; see configs/preprocess/).

Every count is per mesh. The defaults follow the anchors' orders of magnitude (10^5 points per set);
tests and the demo use configs/preprocess/tiny.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.cameras import CameraRig
from data_pipeline.schema import MAX_VIEWS


@dataclass
class WatertightConfig:
    resolution: int = 256           # grid cells per axis over [-1, 1]^3 (power of two); voxel = 2 / resolution
    coarse_resolution: int = 32     # winding numbers are computed everywhere at this level, then refined by doubling
    band_voxels: int = 0            # exact distances this many voxels beyond the corners of the cells the
                                    # surface touches (corners of every crossed cell are completed anyway)
    shell_voxels: float = 1.0       # half-thickness of the shell given to open sheets (|winding| near 0.5), in voxels
    sheet_winding: tuple[float, float] = (0.25, 0.75)  # |winding number| inside this range marks an open sheet
    ambiguous_volume: float = 0.10  # above this fraction of coarse cells with an ambiguous |w| (off the surface): shell method

    def __post_init__(self) -> None:
        for name in ("resolution", "coarse_resolution"):
            value = getattr(self, name)
            if value < 8 or value & (value - 1):
                raise ValueError(f"watertight.{name} must be a power of two >= 8, got {value}")
        if self.coarse_resolution > self.resolution:
            raise ValueError("watertight.coarse_resolution must not exceed watertight.resolution")
        if self.band_voxels < 0:
            raise ValueError(f"watertight.band_voxels must be >= 0, got {self.band_voxels}")


@dataclass
class DeviationGate:
    """max_deviation: a watertight mesh farther than this from its input is a failure, not a sample."""
    p95_voxels: float = 2.0         # p95 of watertight -> input distances, in voxels
    far_voxels: float = 2.0         # watertight area farther than this from the input counts as far ...
    far_area: float = 0.10          # ... and may be at most this fraction of the area (hole caps)
    samples: int = 20_000           # points per surface for the quality record
    resolution: int = 0             # voxel = 2 / resolution; 0: watertight.resolution

    def __post_init__(self) -> None:
        if self.p95_voxels <= 0 or self.far_voxels <= 0 or not 0 <= self.far_area <= 1:
            raise ValueError("max_deviation: p95_voxels and far_voxels must be > 0, far_area in [0, 1]")
        if self.samples < 100 or self.resolution < 0:
            raise ValueError(f"max_deviation: samples must be >= 100 and resolution >= 0, got "
                             f"{self.samples}, {self.resolution}")


@dataclass
class SamplingConfig:
    surface_points: int = 100_000           # uniform, area-weighted points on the watertight surface
    surface_fps_points: int = 16_384        # length of the farthest-point order into them
    sharp_points: int = 50_000              # points on sharp edges (0 when the mesh has none)
    sharp_fps_points: int = 16_384
    sharp_angle_deg: float = 15.0           # dihedral angle above which an edge is sharp
    volume_points: int = 100_000            # uniform queries in [-1.05, 1.05]^3
    near_points_per_sigma: int = 100_000    # surface points + N(0, sigma^2) offsets, per sigma
    near_sigmas: tuple[float, ...] = (0.005, 0.05)
    sharp_near_points_per_sigma: int = 25_000  # same around sharp points (0 disables sharp_near)
    fps_bucket_height: int = 5              # fpsample kd-line bucket height (speed only; the order is exact FPS)

    def __post_init__(self) -> None:
        counts = {k: v for k, v in vars(self).items() if k.endswith("_points") or k.endswith("_per_sigma")}
        for name, value in counts.items():
            if value < 0:
                raise ValueError(f"sampling.{name} must be >= 0, got {value}")
        if self.surface_points < 1:
            raise ValueError("sampling.surface_points must be >= 1")
        if any(s <= 0 for s in self.near_sigmas):
            raise ValueError(f"sampling.near_sigmas must be positive, got {list(self.near_sigmas)}")


@dataclass
class PreprocessConfig:
    watertight: WatertightConfig = field(default_factory=WatertightConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_deviation: DeviationGate = field(default_factory=DeviationGate)
    occupancy_resolution: int = 64          # R of the R^3 occupancy grid (cell centres over [-1.05, 1.05]^3)
    seed: int = 0                           # per-mesh generators are seeded from (seed, mesh id)
    min_faces: int = 4                      # fewer faces than a tetrahedron cannot bound a solid
    shard_max_samples: int = 100            # a shard is closed after this many samples ...
    shard_max_bytes: int = 1_000_000_000    # ... or once it holds this many bytes
    mesh_timeout_s: float = 600.0           # a mesh still running after this is killed and logged as a failure
    views: int = 8                          # condition views rendered per mesh (schema v2); 0 turns rendering off
    render: CameraRig = field(default_factory=CameraRig)   # their size and cameras (data_pipeline/cameras.py)

    def __post_init__(self) -> None:
        if self.occupancy_resolution < 2 or self.occupancy_resolution % 2:
            raise ValueError(f"occupancy_resolution must be an even number >= 2, got {self.occupancy_resolution}")
        if self.shard_max_samples < 1:
            raise ValueError(f"shard_max_samples must be >= 1, got {self.shard_max_samples}")
        if not 0 <= self.views <= MAX_VIEWS:
            raise ValueError(f"views must be in [0, {MAX_VIEWS}], got {self.views}")
        if self.mesh_timeout_s <= 0:
            raise ValueError(f"mesh_timeout_s must be positive, got {self.mesh_timeout_s}")
