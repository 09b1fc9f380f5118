"""Which shape of a shard set does a generated mesh resemble: Chamfer distance to every stored shape.

Used by the image-conditioned demo (the table of generated mesh vs nearest bundled shape) and its test.
Shards are read with plain tarfile: per sample its json (source name), stored surface points and the
condition views (PNG bytes).
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_pipeline import schema
from trainer import meshing
from trainer import objectives as obj

MATCH_POINTS = 2048     # points per shape in the Chamfer distance


@dataclass
class StoredShape:
    source: str                                        # the input's name (json "source")
    surface: np.ndarray                                # float32 [N, 3] stored surface points (normalised)
    views: dict[int, bytes] = field(default_factory=dict)   # view index -> PNG bytes


def read_shapes(shards: Path) -> dict[str, StoredShape]:
    """source name -> StoredShape, for every sample of the folder's shards."""
    members: dict[str, dict[str, bytes]] = {}
    for path in sorted(Path(shards).glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                sample_id, key = member.name.split(".", 1)
                if key == "json" or key == "surface.npy" or key.startswith("view_"):
                    members.setdefault(sample_id, {})[key] = tar.extractfile(member).read()
    shapes = {}
    for parts in members.values():
        meta = json.loads(parts["json"])
        surface = schema.dequantize_coords(np.load(io.BytesIO(parts["surface.npy"])))
        views = {int(k[len("view_"):-len(".png")]): v for k, v in parts.items() if k.startswith("view_")}
        shapes[meta["source"]] = StoredShape(meta["source"], surface, views)
    return shapes


def chamfer_to_shapes(mesh, shapes: dict[str, StoredShape]) -> dict[str, float]:
    """Chamfer distance (normalised units) from a mesh (None: empty level set -> inf) to every shape."""
    if mesh is None:
        return {name: float("inf") for name in shapes}
    points = meshing.surface_points(mesh, MATCH_POINTS)
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in shapes.items():
        pick = rng.choice(len(shape.surface), min(MATCH_POINTS, len(shape.surface)), replace=False)
        out[name] = float(obj.chamfer_and_fscore(points, torch.from_numpy(shape.surface[pick]), 0.02)["chamfer"])
    return out


def load_mesh_file(path: Path):
    """A generated mesh file (.glb/.obj) as one trimesh (None when the file is missing: empty level set)."""
    import trimesh
    if not Path(path).exists():
        return None
    return trimesh.load(str(path), force="mesh", process=False)


def nearest_table(rows: list[tuple[str, object]], shapes: dict[str, StoredShape]) -> tuple[list[dict], int]:
    """For (true shape name, generated mesh) rows: the Chamfer distance to the true shape, the nearest shape
    and its distance; returns (table rows, how many are nearest to their own shape)."""
    table = []
    for true_name, mesh in rows:
        distances = chamfer_to_shapes(mesh, shapes)
        nearest = min(distances, key=distances.get)
        table.append({"shape": true_name, "chamfer_to_true": distances[true_name], "nearest": nearest,
                      "chamfer_to_nearest": distances[nearest], "correct": nearest == true_name})
    return table, sum(row["correct"] for row in table)


def format_table(table: list[dict], total_shapes: int) -> str:
    nearest = f"nearest of {total_shapes} shapes"
    lines = [f"  {'condition view of':22s} {'Chamfer to it':>13s}  {nearest:24s} {'Chamfer':>8s}  ok"]
    for row in table:
        lines.append(f"  {row['shape']:22s} {row['chamfer_to_true']:13.4f}  {row['nearest']:24s} "
                     f"{row['chamfer_to_nearest']:8.4f}  {'yes' if row['correct'] else 'NO'}")
    return "\n".join(lines)
