"""Preprocessing benchmark: seconds per mesh for the watertight conversion at 256^3 and 512^3 on the
bundled real meshes, the whole per-mesh pipeline at the default config (``--full``: CPU seconds of
one core, the share of it spent on the quality record, the watertight method chosen), and the ratio
against a dense-grid baseline measured in the same run.

Dense baseline = the same signed field with the unsigned distance (igl AABB) and the winding number
computed at EVERY grid point, then the same marching cubes. Running it in full takes many minutes
per mesh at 256^3, so by default its per-point cost is measured on a random subset of grid points
and scaled to the (R+1)^3 grid (the cost per point is what it is for any random subset); add
``--dense-full-at 128`` to also run both sides in full at that resolution (marching cubes on both): a
measured ratio there, and the estimate's error against the full run (``est_error_small`` = estimate /
full) to calibrate the estimated ratios.

    python bench/bench_preprocess.py                       # all bundled meshes, 256 and 512
    python bench/bench_preprocess.py --meshes stanford-bunny.obj spot.obj --resolutions 256

One core: libigl's threads are limited with IGL_NUM_THREADS=1 (set below before igl is imported)
and times are CPU seconds of the process (time.process_time), i.e. single-core compute time.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("IGL_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import trimesh  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_pipeline.preprocess.config import PreprocessConfig, WatertightConfig  # noqa: E402
from data_pipeline.preprocess.mesh_io import MESH_EXTENSIONS, load_mesh, normalise  # noqa: E402
from data_pipeline.preprocess.mesh_queries import MeshQueries  # noqa: E402
from data_pipeline.preprocess.pipeline import MeshTask, file_sha256, mesh_id, process_mesh  # noqa: E402
from data_pipeline.preprocess.watertight import extract_surface, make_watertight, signed_grid  # noqa: E402


def timed(fn):
    """(result, CPU seconds of this process). CPU time, not wall time: other jobs on a shared
    machine then do not inflate the numbers (all libraries run one thread here)."""
    start = time.process_time()
    result = fn()
    return result, time.process_time() - start


def dense_estimate(mesh: trimesh.Trimesh, resolution: int, sample: int, mc_seconds: float) -> float:
    """Seconds of the dense baseline: per-point cost on `sample` random grid points x (R+1)^3, plus MC."""
    rng = np.random.default_rng(0)
    index = rng.integers(0, resolution + 1, size=(sample, 3))
    # Grid (C) order, as the dense pass visits points: neighbouring queries reuse the tree's cache.
    index = index[np.lexsort(index.T[::-1])]
    xyz = index * (2.0 / resolution) - 1.0
    queries = MeshQueries(mesh)
    _, seconds = timed(lambda: (queries.distance(xyz), queries.winding(xyz)))
    return seconds / sample * (resolution + 1) ** 3 + mc_seconds


def dense_full(mesh: trimesh.Trimesh, resolution: int) -> tuple[float, float]:
    """(seconds of the whole dense baseline, of which marching cubes) at ``resolution``."""
    cfg = WatertightConfig(resolution=resolution, coarse_resolution=min(32, resolution))
    grid, field_seconds = timed(lambda: signed_grid(mesh, cfg, dense=True))
    _, mc_seconds = timed(lambda: extract_surface(grid))
    return field_seconds + mc_seconds, mc_seconds


def small_rows(mesh: trimesh.Trimesh, resolution: int, sample: int) -> dict:
    """Both sides measured in full at ``resolution`` (marching cubes on both), and the estimate's error there."""
    full, mc = dense_full(mesh, resolution)
    _, ours = timed(lambda: make_watertight(mesh, WatertightConfig(resolution=resolution,
                                                                   coarse_resolution=min(32, resolution))))
    estimate = dense_estimate(mesh, resolution, sample, mc)
    return {"dense_full_small": full, "dense_est_small": estimate, "est_error_small": estimate / full,
            "wt_small": ours, "ratio_small": full / ours}


def bench_mesh(path: Path, args) -> dict:
    raw = load_mesh(path)
    mesh = normalise(raw).mesh
    return run_rows(path.name, mesh, args, path)


def run_rows(name: str, mesh: trimesh.Trimesh, args, path: Path | None) -> dict:
    row = {"mesh": name, "faces": len(mesh.faces)}
    for resolution in args.resolutions:
        result, seconds = timed(lambda: make_watertight(mesh, WatertightConfig(resolution=resolution)))
        row[f"wt{resolution}"] = seconds
        row[f"mc{resolution}"] = result.grid.timings.get("marching_cubes", 0.0)
        row[f"closed{resolution}"] = result.mesh.is_watertight
    base = args.resolutions[0]
    row["dense_est"] = dense_estimate(mesh, base, args.dense_sample, row[f"mc{base}"])
    row["ratio"] = row["dense_est"] / row[f"wt{base}"]
    if args.dense_full_at:
        row.update(small_rows(mesh, args.dense_full_at, args.dense_sample))
    if args.full and path is not None:
        task = MeshTask(str(path), path.name, mesh_id(path.name, file_sha256(path)))
        sample, row["full"] = timed(lambda: process_mesh(task, PreprocessConfig(views=0)))   # views: bench_render.py
        quality = sample["json"]["quality"]
        row["method"], row["quality_share"] = quality["method"], quality["seconds"] / row["full"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshes", nargs="*", help="file names in assets/meshes (default: all)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--dense-sample", type=int, default=100_000, help="grid points timed for the dense baseline")
    parser.add_argument("--dense-full-at", type=int, default=0, help="also run the dense baseline in full at this R")
    parser.add_argument("--full", action="store_true", help="also time the whole pipeline at the default config")
    parser.add_argument("--subdivided-bunny", action="store_true",
                        help="add the bunny subdivided once (278k faces) as a large-mesh case")
    args = parser.parse_args()
    folder = ROOT / "assets" / "meshes"
    names = args.meshes or sorted(p.name for p in folder.iterdir() if p.suffix.lower() in MESH_EXTENSIONS)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or platform.machine()}  "
          f"cpus={os.cpu_count()}  IGL_NUM_THREADS={os.environ['IGL_NUM_THREADS']}  "
          f"load={os.getloadavg()[0]:.1f}")
    columns = ["mesh", "faces"] + [f"wt{r}" for r in args.resolutions] + ["dense_est", "ratio"]
    columns += ["dense_full_small", "dense_est_small", "est_error_small", "wt_small", "ratio_small"] \
        if args.dense_full_at else []
    columns += ["full", "quality_share", "method"] if args.full else []
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    rows = []
    cases = [(name, folder / name) for name in names]
    if args.subdivided_bunny:
        cases.append(("stanford-bunny x4 (subdivided)", None))
    for name, path in cases:
        if path is None:
            mesh = normalise(load_mesh(folder / "stanford-bunny.obj")).mesh.subdivide()
            row = run_rows(name, mesh, argparse.Namespace(**{**vars(args), "full": False}), None)
        else:
            row = bench_mesh(path, args)
        rows.append(row)
        cells = [f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        print("| " + " | ".join(cells) + " |", flush=True)
    base = args.resolutions[0]
    total_ours = sum(r[f"wt{base}"] for r in rows)
    total_dense = sum(r["dense_est"] for r in rows)
    print(f"\nmean s/mesh at {base}^3: {total_ours / len(rows):.2f}; dense baseline {total_dense / len(rows):.1f}; "
          f"ratio of totals {total_dense / total_ours:.0f}x; median ratio {np.median([r['ratio'] for r in rows]):.0f}x")
    for resolution in args.resolutions[1:]:
        print(f"mean s/mesh at {resolution}^3: {np.mean([r[f'wt{resolution}'] for r in rows]):.2f}")
    closed = all(r[f"closed{res}"] for r in rows for res in args.resolutions)
    print(f"all outputs watertight: {closed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
