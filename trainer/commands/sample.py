"""`shapeflow sample CHECKPOINT --out DIR`: meshes from a DiT checkpoint.

Euler sampler from t = 1 (noise) to t = 0 with the training shift, classifier-free guidance for
conditional models, EMA weights by default; latents are decoded by the run's frozen VAE, the SDF is
queried on a grid in chunks and marching cubes gives one mesh per sample (.glb or .obj), plus an
optional PNG preview each.
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
    parser.add_argument("--class-id", type=int, default=None, help="class id for a class-conditioned DiT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=None, help="SDF grid size (default: eval.grid_resolution)")
    parser.add_argument("--chunk", type=int, default=65536, help="SDF queries per forward pass")
    parser.add_argument("--format", choices=("glb", "obj"), default="glb")
    parser.add_argument("--preview", action="store_true", help="also write a PNG preview per mesh")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--vae", default=None, help="VAE checkpoint directory or exported .safetensors file "
                        "(default: the one the DiT was trained with)")


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
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.num, *derived["latent_shape"], generator=gen).to(device)
    with torch.no_grad():
        cond = inference.sampling_condition(cfg.condition, args.num, device, class_id=args.class_id)
        latents = inference.guided_euler(net, noise, cond, steps=args.steps or cfg.eval.sample_steps,
                                         shift=cfg.flow_loss.t_shift,
                                         guidance=cfg.eval.guidance if args.guidance is None else args.guidance)
        grids = inference.decode_grids(vae, latents / derived["scale_factor"], kind=vae_cfg.vae_loss.kind,
                                       resolution=args.resolution or cfg.eval.grid_resolution, chunk=args.chunk)
    out = Path(args.out)
    files, meshes = inference.write_meshes(grids, out, "sample", fmt=args.format, preview=args.preview)
    empty = sum(m is None for m in meshes)
    (out / "samples.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), "files": [str(f) for f in files],
                                                  "empty": empty}, indent=2))
    print(f"shapeflow sample: {len(meshes) - empty} meshes ({empty} empty level sets) in {out}")
    return 0
