"""The full per-mesh preprocessing pipeline of this tree against an older commit, in the same run: a
machine-independent speed ratio (issue 10 measured its 13.0 CPU-s at the end of round 1, commit 180d9a6).

Each version runs in its own process (a ``git worktree`` of the commit under a temporary folder),
pinned to one core with ``taskset`` where available, libigl limited to one thread, timing
``process_mesh`` at the default config (views off where the config has them) in CPU seconds after one
warm-up call (median of ``--repeats``). The two versions alternate for ``--rounds`` rounds and the
ratio is the median of the per-round ratios: a shared VM's speed drifts by 10-20 % over minutes,
which alternation cancels.

    python bench/bench_preprocess_versions.py --commit 180d9a6 --meshes assets/meshes/stanford-bunny.obj
    python bench/bench_preprocess_versions.py --commit 180d9a6 --subdivided-bunny   # + bunny x4 (278k faces)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs inside the child process with the version's root first on sys.path; works with the round-1
# layout (data_pipeline/preprocess.py) and the current one (data_pipeline/preprocess/pipeline.py).
CHILD = r"""
import dataclasses, json, os, statistics, sys, time
root, mesh, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, root)
try:
    from data_pipeline.preprocess.pipeline import MeshTask, file_sha256, mesh_id, process_mesh
    from data_pipeline.preprocess.config import PreprocessConfig
except ImportError:
    from data_pipeline.preprocess import MeshTask, PreprocessConfig, file_sha256, mesh_id, process_mesh
import data_pipeline
assert data_pipeline.__file__.startswith(root), data_pipeline.__file__
fields = {f.name for f in dataclasses.fields(PreprocessConfig)}
cfg = PreprocessConfig(views=0) if "views" in fields else PreprocessConfig()
task = MeshTask(mesh, os.path.basename(mesh), mesh_id(os.path.basename(mesh), file_sha256(mesh)))
process_mesh(task, cfg)
times = []
for _ in range(repeats):
    start = time.process_time()
    process_mesh(task, cfg)
    times.append(time.process_time() - start)
print(json.dumps({"median": statistics.median(times), "times": times}))
"""


def time_version(root: Path, mesh: Path, repeats: int) -> dict:
    env = {**os.environ, "IGL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    out = subprocess.run([*pin, sys.executable, "-c", CHILD, str(root), str(mesh), str(repeats)],
                         env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def subdivided_bunny(folder: Path) -> Path:
    import trimesh
    mesh = trimesh.load(ROOT / "assets" / "meshes" / "stanford-bunny.obj", force="mesh")
    path = folder / "stanford-bunny-x4.ply"
    mesh.subdivide().export(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="180d9a6", help="the older version (default: end of round 1)")
    parser.add_argument("--meshes", nargs="*", default=[str(ROOT / "assets" / "meshes" / "stanford-bunny.obj")])
    parser.add_argument("--subdivided-bunny", action="store_true", help="add the bunny subdivided once (278k faces)")
    parser.add_argument("--repeats", type=int, default=2, help="timings per process (median)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two versions")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.commit], check=True)
        try:
            meshes = [Path(m).resolve() for m in args.meshes]
            if args.subdivided_bunny:
                meshes.append(subdivided_bunny(Path(tmp)))
            print(f"| mesh | {args.commit} CPU-s | this tree CPU-s | ratio (median of rounds) | ratios |\n"
                  "|---|---|---|---|---|")
            for mesh in meshes:
                rounds = [(time_version(old, mesh, args.repeats)["median"], time_version(ROOT, mesh, args.repeats)["median"])
                          for _ in range(args.rounds)]
                before, after = (statistics.median(column) for column in zip(*rounds))
                ratios = [b / a for b, a in rounds]
                print(f"| {mesh.name} | {before:.2f} | {after:.2f} | {statistics.median(ratios):.2f}x | "
                      f"{', '.join(f'{r:.2f}' for r in ratios)} |", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
