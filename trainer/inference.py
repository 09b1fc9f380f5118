"""Inference: the one home of what training-time evaluation, `shapeflow sample`, `shapeflow eval` and the
demo do with a trained network.

* loading: a network or a frozen VAE from a checkpoint directory (any engine strategy) or a
  `shapeflow export` safetensors file;
* encoding: surface points (or an occupancy grid) -> the VAE posterior, the encoder seeing as many
  surface points as in training (the FPS prefix of the stored points);
* conditions: from a batch (training), or for sampling (class ids, or the embeddings of a batch);
* sampling: the Euler sampler with classifier-free guidance (scale ``guidance``);
* decoding: latents -> SDF-like grids -> meshes (marching cubes in trainer/meshing.py) and previews;
* reconstruction metrics: IoU on query points or the grid, Chamfer / F-score against surface points.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import models
from data_pipeline.typed_config import ConfigError, from_dict, load_config
from trainer import checkpoint as ckpt
from trainer import meshing
from trainer import objectives as obj
from trainer.config import ConditionConfig, TrainConfig

# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------

def read_exported(path: Path) -> tuple[dict[str, Tensor], TrainConfig, dict[str, Any]]:
    """(network weights, training config, checkpoint meta) of a `shapeflow export` safetensors file."""
    import yaml
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if "shapeflow_config" not in header:
        raise ConfigError(f"{path}: not a `shapeflow export` file (no shapeflow_config in its metadata)")
    cfg = from_dict(TrainConfig, yaml.safe_load(header["shapeflow_config"]))
    return load_file(str(path)), cfg, json.loads(header["shapeflow_meta"])


def resolve_network_path(path: Path) -> Path:
    """A step directory or .safetensors file as given; a run or checkpoints/ directory -> its latest
    complete checkpoint (said on stderr); see checkpoint.resolve_checkpoint."""
    return ckpt.resolve_checkpoint(path)


def read_network(path: str | Path, use_ema: bool = True) -> tuple[dict[str, Tensor], TrainConfig, dict[str, Any]]:
    """(weights, training config, meta) of a step directory (any strategy), a run directory (its latest
    checkpoint), or a `shapeflow export` / `shapeflow import` safetensors file (weights chosen when written)."""
    path = resolve_network_path(Path(path))
    if path.is_file() and path.suffix == ".safetensors":
        return read_exported(path)
    meta = ckpt.read_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no valid {ckpt.META}), a run directory, "
                                "nor a .safetensors file from `shapeflow export` / `shapeflow import`")
    return ckpt.network_state(path, use_ema, meta), load_config(TrainConfig, path / "config.yaml"), meta


def network_spec(cfg: TrainConfig, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(model preset name, overrides) that rebuild the network a checkpoint holds."""
    return cfg.model.name, dict((meta.get("derived") or {}).get("model_overrides") or cfg.model.overrides)


def load_network(path: str | Path, use_ema: bool = True) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """(network in eval mode, its training config, the checkpoint's meta) from any form read_network reads."""
    state, cfg, meta = read_network(path, use_ema)
    name, overrides = network_spec(cfg, meta)
    net = models.build(name, **overrides)
    net.load_state_dict(state)
    return net.eval(), cfg, meta


def latent_scale_factor(path: str | Path) -> float | None:
    """The latent scale factor an imported release carries (Hunyuan3D-2.1: 1.0039..., PartPacker: 1), else None."""
    path = resolve_network_path(Path(path))
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("shapeflow_meta", "{}"))
    else:
        meta = ckpt.read_meta(path) or {}
    return (meta.get("interop") or {}).get("latent_scale_factor")


def load_frozen_vae(checkpoint: str | Path, use_ema: bool, device: torch.device) -> tuple[nn.Module, TrainConfig]:
    """The VAE of a `task=vae` checkpoint (or export), frozen and in eval mode, with its training config."""
    try:
        net, cfg, _ = load_network(checkpoint, use_ema=use_ema)
    except FileNotFoundError as err:
        raise ConfigError(f"vae.checkpoint: {err}") from None
    if cfg.task != "vae":
        raise ConfigError(f"vae.checkpoint: {checkpoint} is a task={cfg.task} checkpoint, not a VAE")
    net.requires_grad_(False)
    return net.eval().to(device), cfg


def load_run_vae(cfg: TrainConfig, device: torch.device, path: str | Path | None = None):
    """The frozen VAE of a DiT run ``cfg`` (``path`` overrides vae.checkpoint), with the run's
    ``vae.use_ema`` choice of weights: training and sampling decode with the same VAE."""
    return load_frozen_vae(path or cfg.vae.checkpoint, cfg.vae.use_ema, device)


# ---------------------------------------------------------------------------
# encoding and conditions
# ---------------------------------------------------------------------------

def vae_point_counts(cfg: TrainConfig, net: nn.Module) -> dict[str, int]:
    """Surface and sharp-edge points per sample for a VecSet VAE, derived from its model: data.options,
    else 4 points per query token of each type (uniform: at least 512). Raises ConfigError when a token
    type the model declares would get fewer points than tokens (sharp tokens silently unused before)."""
    mc, opts = net.config, cfg.data.options
    counts = {"num_surface": int(opts.get("num_surface", max(4 * mc.num_latents, 512))),
              "num_sharp": int(opts.get("num_sharp", 4 * mc.num_sharp_latents))}
    for key, tokens, name in (("num_surface", mc.num_latents, "num_latents"),
                              ("num_sharp", mc.num_sharp_latents, "num_sharp_latents")):
        if counts[key] < tokens:
            raise ConfigError(f"data.options.{key}: {counts[key]} points per sample cannot feed the {tokens} "
                              f"{name} query tokens of {cfg.model.name}: raise it (default {4 * tokens}) or "
                              f"set model.overrides.{name}")
    return counts


def vae_num_surface(cfg: TrainConfig, net: nn.Module) -> int:
    """Surface points per sample a VecSet VAE run feeds its encoder (data.options or the default)."""
    return vae_point_counts(cfg, net)["num_surface"]


def encode(vae: nn.Module, vae_cfg: TrainConfig, batch: dict[str, Any],
           counts: tuple[int, int] | None = None) -> models.DiagonalGaussian:
    """The posterior of a batch: the occupancy grid for the voxel VAE; for the VecSet VAE the first
    ``vae_num_surface`` surface points (the FPS prefix: as many as the encoder saw in training) and
    ``counts`` = (uniform, sharp) query tokens (None: the config's)."""
    if isinstance(vae, models.VoxelVAE):
        return vae.encode(batch["occ"])
    n = vae_num_surface(vae_cfg, vae)
    uniform, sharp = counts or (None, None)
    return vae.encode(batch["surface"][:, :n], batch["surface_normal"][:, :n], batch.get("sharp"),
                      batch.get("sharp_normal"), num_latents=uniform, num_sharp_latents=sharp)


def make_image_encoder(cfg: TrainConfig, device: torch.device):
    """The frozen DINOv2 of condition.kind=image (None for other kinds); see trainer/image_encoder.py."""
    cond = cfg.condition
    if cond.kind != "image":
        return None
    from trainer.image_encoder import ImageEncoder  # transformers is only imported when used
    encoder = ImageEncoder(cond.image_encoder, cond.image_size, tuple(cond.background), cond.recenter).to(device)
    if cond.cache:
        encoder.cache = {}
    return encoder


def batch_condition(cond_cfg: ConditionConfig, batch: dict[str, Any], encoder: nn.Module | None = None) -> Tensor | None:
    """The condition of a training batch: class ids [B], embedding tokens [B, T, D], or the image
    encoder's tokens [B, 1 + P, D] of the batch's views (None: unconditional)."""
    if cond_cfg.kind == "none":
        return None
    if cond_cfg.kind == "class":
        return batch[cond_cfg.key or "class_id"].long()
    if cond_cfg.kind == "embedding":
        cond = batch[cond_cfg.key or "condition"].float()
        return cond[:, None] if cond.ndim == 2 else cond
    if encoder is None:
        raise ConfigError("condition.kind=image: no image encoder (inference.make_image_encoder) was given")
    return encoder.encode_views(batch[cond_cfg.key or "view"], batch["id"], batch["view_index"])


def sampling_condition(cond_cfg: ConditionConfig, n: int, device: torch.device, *, class_id: int | None = None,
                       batch: dict[str, Any] | None = None, encoder: nn.Module | None = None,
                       images: list[np.ndarray] | None = None) -> Tensor | None:
    """The condition of ``n`` samples: ``class_id`` for all, else classes 0, 1, ... in turn; embeddings
    and image views are taken from ``batch`` (the first ``n`` rows); ``images``: one user picture per
    sample (uint8 [H, W, 3|4], encoded one at a time since sizes may differ)."""
    if cond_cfg.kind == "class":
        if class_id is not None:
            return torch.full((n,), class_id, dtype=torch.long, device=device)
        return torch.arange(n, device=device) % cond_cfg.num_classes
    if cond_cfg.kind == "image" and images is not None:
        return torch.cat([encoder(torch.from_numpy(np.array(image))[None].to(device)) for image in images])
    if cond_cfg.kind in ("embedding", "image") and batch is not None:
        return batch_condition(cond_cfg, batch, encoder)[:n]
    if cond_cfg.kind != "none":
        raise ConfigError(f"condition.kind={cond_cfg.kind}: sampling needs condition embeddings or images "
                          "(a batch, or --image / --views-from)")
    return None


# ---------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------

def guided_euler(net: nn.Module, noise: Tensor, cond: Tensor | None, *, steps: int, shift: float,
                 guidance: float) -> Tensor:
    """Sample x0 from noise [B, ...]; with a condition and guidance != 1 both branches run each step."""
    batch = noise.shape[0]
    guided = cond is not None and guidance != 1.0
    null = net.null_condition(batch, cond.shape[1] if cond is not None and cond.ndim == 3 else 1) if guided else None

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        if not guided:
            return net(x, t, cond)
        both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null.to(cond.dtype), cond]))
        v_uncond, v_cond = both.chunk(2)
        return obj.cfg_mix(v_uncond, v_cond, guidance)

    return obj.euler_sample(velocity, noise, steps=steps, shift=shift)


# ---------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------

def as_sdf(pred: Tensor, kind: str) -> Tensor:
    """A network output as an SDF-like field (negative inside): occupancy logits are positive inside."""
    return pred if kind == "sdf" else -pred


@torch.no_grad()
def decode_grids(vae: nn.Module, latents: Tensor, *, kind: str, resolution: int, chunk: int) -> list[np.ndarray]:
    """Unscaled latents [B, ...] -> one SDF-like grid per sample (negative inside).

    VecSet VAE: decode once, query the grid in chunks (``resolution`` per axis). Voxel VAE: the decoder
    output is the grid itself (occupancy logits, turned into -logits)."""
    if isinstance(vae, models.VoxelVAE):
        logits = vae.decode(latents).float()[:, 0]
        return [(-g).cpu().numpy() for g in logits]
    hidden = vae.decode(latents)
    return [meshing.query_grid(lambda xyz, h=h: as_sdf(vae.query(h[None], xyz), kind), resolution, chunk,
                               latents.device) for h in hidden]


def write_meshes(grids: list[np.ndarray], out_dir: Path, prefix: str, fmt: str = "obj",
                 preview: bool = True, inputs: list[np.ndarray] | None = None) -> tuple[list[Path], list[Any]]:
    """Marching cubes on each grid; writes meshes (+ PNG previews cropped to the object, next to
    ``inputs[i]`` [P, 3], the input's points, when given); returns (files, meshes or None)."""
    files, meshes = [], []
    for i, grid in enumerate(grids):
        mesh = meshing.grid_to_mesh(grid)
        meshes.append(mesh)
        if mesh is not None:
            files.append(meshing.save_mesh(mesh, out_dir / f"{prefix}_{i:02d}.{fmt}"))
        if preview:
            files.append(meshing.save_preview(mesh, out_dir / f"{prefix}_{i:02d}.png", f"{prefix} {i}",
                                              reference=None if inputs is None else inputs[i]))
    return files, meshes


def input_points(batch: dict[str, Any]) -> list[np.ndarray]:
    """Per sample [P, 3] points showing a VAE's input: its surface points, or the occupied voxel centres
    of an occupancy grid [B, 1, D, H, W] (in the schema box, as grid_to_mesh places cells)."""
    if "surface" in batch and batch["surface"].shape[1] > 1:
        return [s.cpu().numpy() for s in batch["surface"]]
    out = []
    for occ in batch["occ"][:, 0].cpu().numpy():
        cells = np.argwhere(occ > 0.5)
        out.append(((cells + 0.5) / np.array(occ.shape) * 2 * meshing.COORD_RANGE - meshing.COORD_RANGE)
                   .astype(np.float32))
    return out


# ---------------------------------------------------------------------------
# reconstruction metrics
# ---------------------------------------------------------------------------

@dataclass
class Reconstruction:
    grids: list[np.ndarray]      # one SDF-like grid per sample
    iou: Tensor                  # [B] IoU of the inside sets (all queries, or the voxel grid)
    pred: Tensor | None          # [B, Q] SDF-like values at batch["query"] (VecSet VAE only)


@torch.no_grad()
def reconstruct(vae: nn.Module, vae_cfg: TrainConfig, batch: dict[str, Any], *, resolution: int,
                chunk: int) -> Reconstruction:
    """Encode (posterior mode) and decode a batch; IoU against the stored queries (or occupancy grid)."""
    kind = vae_cfg.vae_loss.kind
    latents = encode(vae, vae_cfg, batch).mode()
    if isinstance(vae, models.VoxelVAE):
        grids = decode_grids(vae, latents, kind=kind, resolution=0, chunk=chunk)
        truth = torch.where(batch["occ"][:, 0] > 0.5, -1.0, 1.0).cpu()
        iou = obj.volume_iou(torch.from_numpy(np.stack(grids)).flatten(1), truth.flatten(1))
        return Reconstruction(grids, iou, None)
    pred = as_sdf(vae.query(vae.decode(latents), batch["query"]), kind)
    grids = decode_grids(vae, latents, kind=kind, resolution=resolution, chunk=chunk)
    return Reconstruction(grids, obj.volume_iou(pred, batch["sdf"]), pred)


def surface_scores(mesh: Any, surface: Tensor, threshold: float, count: int) -> dict[str, float]:
    """Chamfer / F-score between ``count`` points on the mesh (None: empty) and surface points [N, 3]."""
    return obj.chamfer_and_fscore(meshing.surface_points(mesh, count), surface.cpu(), threshold)
