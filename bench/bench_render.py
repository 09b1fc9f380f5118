"""Condition-view rendering benchmark: seconds for K views at S px per mesh on one core.

Stages per mesh: colour extraction (appearance.colored_parts), upload + rendering of K views with 4x
MSAA (render.ViewRenderer through moderngl on Mesa llvmpipe, LP_NUM_THREADS=1), PNG encoding. The
GL context is made once per process (its ~0.5 s start-up is reported apart, as a worker pays it once).
``--embree`` also times the alternative that was measured against it: one ray per pixel through
trimesh's Embree ray caster (embreex; only hit tests, no shading, so a lower bound for that route).

    python bench/bench_render.py                                   # 100k-face bunny + textured GLBs
    python bench/bench_render.py --views 8 --size 518 --faces 100000 --embree
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("LP_NUM_THREADS", "1")     # llvmpipe rasteriser threads: one core
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import trimesh

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_pipeline import cameras
from data_pipeline.preprocess import render
from data_pipeline.preprocess.appearance import colored_parts
from data_pipeline.preprocess.mesh_io import normalise, read_parts


def clock():
    return time.perf_counter(), time.process_time()


def since(start) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def dense_mesh(faces: int) -> trimesh.Trimesh:
    """The bundled bunny (69k faces) with enough of its faces split in four to have ``faces`` faces
    (real geometry; each split adds 3 faces; T-junctions do not matter for rasterisation cost)."""
    mesh = read_parts(ROOT / "assets/meshes/stanford-bunny.obj")[0]
    while len(mesh.faces) < faces:
        split = min(len(mesh.faces), -(-(faces - len(mesh.faces)) // 3))
        mesh = mesh.subdivide(face_index=np.arange(split))
    return mesh


def bench_mesh(name: str, parts: list[trimesh.Trimesh], views: int, size: int) -> dict:
    norm = normalise(trimesh.util.concatenate(parts) if len(parts) > 1 else parts[0])
    rig = cameras.CameraRig(resolution=size)
    cams = cameras.sample_cameras("0123456789abcdef01234567", views, rig)
    start = clock()
    coloured = colored_parts(parts, norm.center, norm.scale)
    colour_s = since(start)
    start = clock()
    images = render.render_views(coloured, cams, size)
    render_s = since(start)
    start = clock()
    blobs = [render.encode_png(image) for image in images]
    png_s = since(start)
    total = [a + b + c for a, b, c in zip(colour_s, render_s, png_s)]
    faces = sum(len(p.faces) for p in parts)
    print(f"{name:28s} faces={faces:7d}  colours {colour_s[0]:.3f}s  render {render_s[0]:.3f}s  "
          f"png {png_s[0]:.3f}s  total wall {total[0]:.3f}s cpu {total[1]:.3f}s  "
          f"png kB/view {sum(map(len, blobs)) / len(blobs) / 1024:.0f}  "
          f"coverage {np.mean([(im[..., 3] > 0).mean() for im in images]):.2f}")
    return {"wall": total[0], "cpu": total[1]}


def bench_embree(mesh: trimesh.Trimesh, views: int, size: int) -> None:
    try:
        from trimesh.ray.ray_pyembree import RayMeshIntersector
    except ImportError as err:
        print(f"embree: not available ({err})")
        return
    norm = normalise(mesh).mesh
    cams = cameras.sample_cameras("0123456789abcdef01234567", views, cameras.CameraRig(resolution=size))
    start = clock()
    caster = RayMeshIntersector(norm)
    pixels = np.stack(np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5), -1).reshape(-1, 2)
    for cam in cams:
        k, w2c = np.array(cam["intrinsics"]), np.array(cam["world_to_camera"])
        rays = np.c_[(pixels - k[:2, 2]) / np.diag(k)[:2], np.ones(len(pixels))] @ w2c[:3, :3]  # world directions
        origin = -w2c[:3, :3].T @ w2c[:3, 3]
        caster.intersects_first(np.broadcast_to(origin, rays.shape), rays)
    wall, cpu = since(start)
    print(f"embree ray casting (hit test only, 1 ray/pixel): wall {wall:.3f}s cpu {cpu:.3f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--embree", action="store_true")
    args = parser.parse_args()
    start = clock()
    render._context()
    print(f"python {platform.python_version()}  cpus={os.cpu_count()}  LP_NUM_THREADS={os.environ['LP_NUM_THREADS']}  "
          f"GL: {render._context().info['GL_RENDERER']}  context start-up {since(start)[0]:.2f}s")
    dense = dense_mesh(args.faces)
    bench_mesh("bunny subdivided", [dense], args.views, args.size)   # warm-up (shader compile)
    results = [bench_mesh("bunny subdivided", [dense], args.views, args.size)]
    for name in ("Duck.glb", "CesiumMilkTruck.glb", "spot.obj"):
        results.append(bench_mesh(name, read_parts(ROOT / "assets/meshes" / name), args.views, args.size))
    print(f"{args.views} views at {args.size} px, {len(dense.faces)}-face mesh: {results[0]['cpu']:.2f} s CPU "
          f"(one core; target <= 1.5 s), {results[0]['wall']:.2f} s wall")
    if args.embree:
        bench_embree(dense, args.views, args.size)


if __name__ == "__main__":
    main()
