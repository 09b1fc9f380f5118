"""`shapeflow sample CHECKPOINT --out DIR`: meshes from a DiT checkpoint.

Euler sampler from t = 1 (noise) to t = 0 with the training shift, classifier-free guidance for
conditional models, EMA weights by default; latents are decoded by the run's frozen VAE, the SDF is
queried on a grid in chunks and marching cubes gives one mesh per sample (.glb or .obj), plus an
optional PNG preview each.

Image-conditioned DiTs (condition.kind=image): ``--image photo.png`` (repeatable) gives one mesh and one
preview per image; an RGBA image is composited on the run's condition.background, an RGB image is used
as given (so cut the object out, or give it on a plain background). ``--views-from SHARDS`` takes the
condition views of the first ``--num`` samples of a shard set instead (view condition.eval_view) and
also writes the true shape's stored surface points' Chamfer distance to each generated mesh.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from data_pipeline.typed_config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="DiT checkpoint directory (run.dir/checkpoints/step_XXXXXXXX, any "
                        "engine strategy) or a `shapeflow export` .safetensors file")
    parser.add_argument("--out", required=True, help="output directory for meshes and previews")
    parser.add_argument("--num", type=int, default=4, help="number of shapes (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: the run's eval.sample_steps)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the run's eval.guidance)")
    parser.add_argument("--image", action="append", default=[], help="condition image (PNG/JPEG; RGBA is "
                        "composited on the run's background, RGB used as given); repeat for several")
    parser.add_argument("--views-from", default=None, metavar="SHARDS",
                        help="take condition views from these shards (the first --num samples)")
    parser.add_argument("--class-id", type=int, default=None, help="class id for a class-conditioned DiT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=None, help="SDF grid size (default: eval.grid_resolution)")
    parser.add_argument("--chunk", type=int, default=65536, help="SDF queries per forward pass")
    parser.add_argument("--format", choices=("glb", "obj"), default="glb")
    parser.add_argument("--preview", action="store_true", help="also write a PNG preview per mesh")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--vae", default=None, help="VAE checkpoint directory or exported .safetensors file "
                        "(default: the one the DiT was trained with)")


def _views(cfg, args) -> tuple[list | None, dict | None]:
    """(condition images as uint8 arrays, the shard batch they came from or None)."""
    if cfg.condition.kind != "image":
        if args.image or args.views_from:
            raise ConfigError("--image/--views-from: this DiT is not image-conditioned "
                              f"(condition.kind={cfg.condition.kind})")
        return None, None
    if bool(args.image) == bool(args.views_from):
        raise ConfigError("--image/--views-from: an image-conditioned DiT needs condition images: "
                          "give --image FILE (repeatable) or --views-from SHARDS")
    if args.image:
        from trainer.image_encoder import image_from_file
        return [image_from_file(path) for path in args.image], None
    from data_pipeline.loading.loader import make_loader
    loader = make_loader(args.views_from, task="dit", batch_size=args.num, mode="eval", seed=0, rank=0,
                         world_size=1, num_surface=2048, condition="image", view=cfg.condition.eval_view)
    batch = next(iter(loader))
    keep = int(batch["valid"].sum())
    return [v.numpy() for v in batch["view"][:keep]], {k: v[:keep] for k, v in batch.items() if k != "_cursor"}


def run(args: argparse.Namespace) -> int:
    from trainer import inference

    if args.num < 1:
        raise ValueError("--num must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net, cfg, meta = inference.load_network(Path(args.checkpoint), use_ema=not args.no_ema)
    if cfg.task != "dit":
        raise ConfigError(f"{args.checkpoint} is a task={cfg.task} checkpoint; `shapeflow sample` needs a DiT")
    derived = meta.get("derived") or {}
    vae_path = args.vae or cfg.vae.checkpoint
    if not vae_path:
        raise ConfigError("--vae: the DiT was trained on cached latents; give the VAE checkpoint to decode them")
    if cfg.condition.kind == "class" and args.class_id is None:
        raise ConfigError("--class-id: this DiT is class-conditioned; give a class id")
    vae, vae_cfg = inference.load_run_vae(cfg, device, vae_path)   # EMA or raw weights as the run's vae.use_ema
    net = net.to(device)
    views, shard_batch = _views(cfg, args)
    num = len(views) if views is not None else args.num
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(num, *derived["latent_shape"], generator=gen).to(device)
    with torch.no_grad():
        cond = inference.sampling_condition(cfg.condition, num, device, class_id=args.class_id,
                                            encoder=inference.make_image_encoder(cfg, device), images=views)
        latents = inference.guided_euler(net, noise, cond, steps=args.steps or cfg.eval.sample_steps,
                                         shift=cfg.flow_loss.t_shift,
                                         guidance=cfg.eval.guidance if args.guidance is None else args.guidance)
        grids = inference.decode_grids(vae, latents / derived["scale_factor"], kind=vae_cfg.vae_loss.kind,
                                       resolution=args.resolution or cfg.eval.grid_resolution, chunk=args.chunk)
    out = Path(args.out)
    files, meshes = inference.write_meshes(grids, out, "sample", fmt=args.format,
                                           preview=args.preview or views is not None)
    empty = sum(m is None for m in meshes)
    listing = {"checkpoint": str(args.checkpoint), "files": [str(f) for f in files], "empty": empty}
    if views is not None:
        listing["conditions"] = args.image or [f"{args.views_from}:{i}" for i in shard_batch["id"]]
        listing["files"] += [str(_side_by_side(view, out, i)) for i, view in enumerate(views)]
    if shard_batch is not None:
        listing["chamfer_to_true"] = _chamfer_to_true(meshes, shard_batch)
    (out / "samples.json").write_text(json.dumps(listing, indent=2))
    print(f"shapeflow sample: {len(meshes) - empty} meshes ({empty} empty level sets) in {out}")
    return 0


def _side_by_side(view, out: Path, index: int) -> Path:
    from trainer.meshing import save_side_by_side
    return save_side_by_side([view, out / f"sample_{index:02d}.png"], out / f"condition_{index:02d}.png")


def _chamfer_to_true(meshes: list, batch: dict) -> list[float | None]:
    """Chamfer distance of each generated mesh to its condition sample's stored surface points."""
    from trainer import meshing
    from trainer import objectives as obj
    return [None if mesh is None else float(obj.chamfer_and_fscore(
        meshing.surface_points(mesh, 4096), batch["surface"][i], 0.02)["chamfer"]) for i, mesh in enumerate(meshes)]
