"""Faithful watertight conversion: try the methods in order, measure each result against the input,
keep the first that passes the ``max_deviation`` gate, else fail with the measured numbers.

Quality record (json ``quality``), measured on ``samples`` area-weighted points of each surface:

* ``wt_to_input``: distances from the watertight surface to the input (p50/p95/max, normalised units);
  a blocky or misplaced conversion shows up here;
* ``input_to_wt``: the same from the input to the watertight surface (lost parts show up here);
* ``far_area``: fraction of the watertight area farther than ``far_voxels`` from the input (hole caps);
* ``area_ratio`` (watertight / input area; about 2 for a shelled sheet) and ``volume_over_area_voxels``
  (watertight volume / area in voxels: a mean half-thickness, about ``shell_voxels`` for a shell).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import trimesh

from data_pipeline.preprocess.config import DeviationGate, PreprocessConfig
from data_pipeline.preprocess.mesh_queries import MeshQueries
from data_pipeline.preprocess.sdf import SdfLabeller
from data_pipeline.preprocess.watertight import (
    WatertightError,
    WatertightResult,
    make_watertight,
    signed_volume,
)

METHODS = ("winding", "shell")   # winding-number solid first; the eps-shell where that is not faithful


class FidelityError(WatertightError):
    """No method gave a watertight mesh within the max_deviation gate (the message has the numbers)."""


@dataclass
class Conversion:
    result: WatertightResult
    labeller: SdfLabeller    # distance/sign structures of the watertight mesh, reused for the labels
    quality: dict


def faithful_watertight(mesh: trimesh.Trimesh, cfg: PreprocessConfig) -> Conversion:
    queries = MeshQueries(mesh, cfg.watertight.sheet_winding)
    gate = cfg.max_deviation
    voxel = 2.0 / (gate.resolution or cfg.watertight.resolution)
    reasons = []
    for method in METHODS:
        try:
            result = make_watertight(mesh, cfg.watertight, method=method, queries=queries)
        except WatertightError as err:   # no solid, or w ambiguous over a large volume: next method
            reasons.append(f"{method}: {err}")
            continue
        labeller = SdfLabeller(result.mesh, result.grid)
        quality = quality_record(mesh, result.mesh, queries, labeller, voxel, gate)
        quality["method"] = method
        failure = gate_failure(quality, gate)
        if failure is None:
            return Conversion(result, labeller, quality)
        reasons.append(f"{method}: {failure}")
    raise FidelityError("max_deviation: " + "; ".join(reasons))


def quality_record(original: trimesh.Trimesh, watertight: trimesh.Trimesh, queries: MeshQueries,
                   labeller: SdfLabeller, voxel: float, gate: DeviationGate) -> dict:
    start = time.process_time()
    on_wt, _ = trimesh.sample.sample_surface(watertight, gate.samples, seed=1)
    on_input, _ = trimesh.sample.sample_surface(original, gate.samples, seed=2)
    to_input, _ = queries.distance(on_wt)
    to_wt = labeller.distance(on_input)
    area = float(watertight.area)
    return {
        "voxel": voxel,
        "wt_to_input": _percentiles(to_input),
        "input_to_wt": _percentiles(to_wt),
        "far_area": float(np.mean(to_input > gate.far_voxels * voxel)),
        "area_ratio": area / max(float(original.area), 1e-30),
        "volume_over_area_voxels": signed_volume(watertight) / area / voxel,
        "seconds": round(time.process_time() - start, 4),
    }


def _percentiles(distance: np.ndarray) -> dict:
    p50, p95 = np.percentile(distance, [50, 95])
    return {"p50": float(p50), "p95": float(p95), "max": float(distance.max())}


def gate_failure(quality: dict, gate: DeviationGate) -> str | None:
    """None if ``quality`` passes the gate, else the measured numbers that fail it."""
    voxel, p95, far = quality["voxel"], quality["wt_to_input"]["p95"], quality["far_area"]
    problems = []
    if p95 > gate.p95_voxels * voxel:
        problems.append(f"surface p95 {p95:.4f} = {p95 / voxel:.1f} voxels > {gate.p95_voxels:g}")
    if far > gate.far_area:
        problems.append(f"far area {far:.1%} > {gate.far_area:.0%} (beyond {gate.far_voxels:g} voxels)")
    if not problems:
        return None
    return ", ".join(problems) + f" (max {quality['wt_to_input']['max']:.4f}, voxel {voxel:.4f})"
