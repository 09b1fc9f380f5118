"""Every bundled/real mesh -> faithful watertight conversion at the default config, or a failure reason.

    python bench/fidelity_real_meshes.py [FOLDER ...]    # default: assets/meshes

Prints one row per mesh: method, wt->input p50/p95/max, far area, input->wt p95 (normalised units,
the mesh in [-0.95, 0.95]^3), CPU seconds of conversion + quality record; the issue-10 check is
p95 wt->input <= 0.02 or a failure line.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("IGL_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_pipeline.preprocess.config import PreprocessConfig  # noqa: E402
from data_pipeline.preprocess.fidelity import faithful_watertight  # noqa: E402
from data_pipeline.preprocess.mesh_io import MESH_EXTENSIONS, MeshError, load_mesh, normalise  # noqa: E402
from data_pipeline.preprocess.watertight import WatertightError  # noqa: E402


def row(path: Path, cfg: PreprocessConfig) -> str:
    start = time.process_time()
    try:
        q = faithful_watertight(normalise(load_mesh(path)).mesh, cfg).quality
    except (MeshError, WatertightError) as err:
        return f"| {path.name} | FAILED: {err} | | | | | | {time.process_time() - start:.1f} |"
    a, b = q["wt_to_input"], q["input_to_wt"]
    ok = "yes" if a["p95"] <= 0.02 else "NO"
    return (f"| {path.name} | {q['method']} | {a['p50']:.4f} / {a['p95']:.4f} / {a['max']:.4f} | {q['far_area']:.1%} | "
            f"{b['p95']:.4f} | {q['area_ratio']:.2f} | {ok} | {time.process_time() - start:.1f} (quality {q['seconds']:.2f}) |")


def main() -> int:
    folders = [Path(f) for f in sys.argv[1:]] or [ROOT / "assets" / "meshes"]
    cfg = PreprocessConfig()
    print("| mesh | method | wt->input p50 / p95 / max | far area | input->wt p95 | area ratio | p95 <= 0.02 | CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in folders:
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in MESH_EXTENSIONS):
            print(row(path, cfg), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
