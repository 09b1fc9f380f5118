"""`shapeflow eval VAE_CHECKPOINT --data SHARDS --out metrics.json`: VAE reconstruction metrics.

Every sample of the shard set once (the loader's evaluation mode): encode (posterior mode, EMA weights
by default), IoU of the inside sets on the stored volume + near-surface queries, and Chamfer distance /
F-score between the marching-cubes surface of the reconstruction and the stored surface points.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from data_pipeline.progress import progress
from data_pipeline.typed_config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="VAE checkpoint directory")
    parser.add_argument("--data", required=True, help="shard directory or URL list to evaluate on")
    parser.add_argument("--out", required=True, help="JSON file for the metrics")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-samples", type=int, default=0, help="stop after this many samples (0: all)")
    parser.add_argument("--resolution", type=int, default=64, help="SDF grid size for the Chamfer / F-score mesh")
    parser.add_argument("--chunk", type=int, default=65536)
    parser.add_argument("--threshold", type=float, default=0.02, help="F-score distance threshold (normalised units)")
    parser.add_argument("--surface-points", type=int, default=4096, help="points per surface for Chamfer / F-score")
    parser.add_argument("--no-ema", action="store_true")
    parser.add_argument("--previews", default=None, help="directory for one PNG per sample: input surface "
                        "points next to the reconstruction, cropped to the object")


def _loader(args, cfg, net, voxel: bool):
    from data_pipeline.loading.loader import make_loader
    from trainer.inference import vae_point_counts

    if voxel:
        options = {**cfg.data.options, "occupancy": True}
    else:   # the surface and sharp-edge points the run fed its encoder (sharp tokens need sharp points)
        options = {**cfg.data.options, **vae_point_counts(cfg, net)}
    options.update(num_surface=max(args.surface_points, options.get("num_surface", 0)))
    return make_loader(args.data, task="vae", batch_size=args.batch_size, mode="eval", seed=0, rank=0,
                       world_size=1, **options)


def _evaluate_batch(net, batch, cfg, args) -> list[dict]:
    from trainer import inference, meshing

    rec = inference.reconstruct(net, cfg, batch, resolution=args.resolution, chunk=args.chunk)
    rows = []
    for i, grid in enumerate(rec.grids):
        if not bool(batch["valid"][i]):
            continue
        mesh = meshing.grid_to_mesh(grid)
        scores = inference.surface_scores(mesh, batch["surface"][i], args.threshold, args.surface_points)
        rows.append({"id": batch["id"][i], "iou": float(rec.iou[i]), **scores})
        if args.previews:
            meshing.save_preview(mesh, Path(args.previews) / f"{batch['id'][i]}.png",
                                 f"{batch['id'][i]}: IoU {float(rec.iou[i]):.3f}, F-score {scores['fscore']:.3f}",
                                 reference=inference.input_points(batch)[i])
    return rows


def run(args: argparse.Namespace) -> int:
    import models
    from trainer.inference import load_network

    net, cfg, _ = load_network(Path(args.checkpoint), use_ema=not args.no_ema)
    if cfg.task != "vae":
        raise ConfigError(f"{args.checkpoint} is a task={cfg.task} checkpoint; `shapeflow eval` needs a VAE")
    voxel = isinstance(net, models.VoxelVAE)
    rows: list[dict] = []
    loader = _loader(args, cfg, net, voxel)
    bar = progress(len(loader), "eval", "batch")      # an evaluation pass has a known batch count
    for batch in loader:
        rows += _evaluate_batch(net, batch, cfg, args)
        bar.update(1)
        if args.max_samples and len(rows) >= args.max_samples:
            rows = rows[: args.max_samples]
            break
    bar.close()
    if not rows:
        raise ValueError(f"{args.data}: no samples to evaluate")
    finite = lambda key: [r[key] for r in rows if np.isfinite(r[key])]  # noqa: E731
    summary = {"checkpoint": str(args.checkpoint), "data": str(args.data), "samples": len(rows),
               "threshold": args.threshold,
               "mean": {k: float(np.mean(finite(k))) if finite(k) else None for k in ("iou", "chamfer", "fscore")},
               "per_sample": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    m = summary["mean"]
    print(f"shapeflow eval: {len(rows)} samples: IoU {m['iou']:.3f}, Chamfer {m['chamfer']}, F-score {m['fscore']} -> {out}")
    return 0
