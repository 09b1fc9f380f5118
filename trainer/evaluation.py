"""Evaluation during training, and decoding latents to meshes (shared with `shapeflow sample` / `eval`).

At eval intervals rank 0 uses the EMA weights to
* VAE: reconstruct a fixed batch of training shapes: IoU on its query points, Chamfer / F-score of the
  marching-cubes surface against the stored surface points, meshes (.obj) and PNG previews;
* DiT: sample shapes with the Euler sampler (+ CFG), decode them with the frozen VAE, meshes and PNGs.
Everything goes to ``run.dir/eval/step_XXXXXXXX/`` and to the MLflow run. Other ranks wait.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import models
from data_pipeline.loading.batches import VaeOptions

from trainer import meshing
from trainer import objectives as obj
from trainer.config import TrainConfig
from trainer.tasks import as_sdf, to_device


# ---------------------------------------------------------------------------
# latents -> SDF-like grids
# ---------------------------------------------------------------------------

@torch.no_grad()
def decode_grids(vae: nn.Module, latents: torch.Tensor, *, kind: str, resolution: int,
                 chunk: int) -> list[np.ndarray]:
    """Unscaled latents [B, ...] -> one SDF-like grid per sample (negative inside).

    VecSet VAE: decode once, query the grid in chunks (``resolution`` per axis). Voxel VAE: the decoder
    output is the grid itself (occupancy logits, turned into -logits)."""
    if isinstance(vae, models.VoxelVAE):
        logits = vae.decode(latents).float()[:, 0]
        return [(-g).cpu().numpy() for g in logits]
    hidden = vae.decode(latents)
    return [meshing.query_grid(lambda xyz, h=h: as_sdf(vae.query(h[None], xyz), kind), resolution, chunk,
                               latents.device) for h in hidden]


def euler_with_cfg(net: nn.Module, noise: torch.Tensor, cond: torch.Tensor | None, *, steps: int,
                   shift: float, cfg_scale: float) -> torch.Tensor:
    """Sample x0 from noise; with a condition and cfg_scale != 1 both branches run each step."""
    batch = noise.shape[0]
    guided = cond is not None and cfg_scale != 1.0
    null = net.null_condition(batch, cond.shape[1] if cond is not None and cond.ndim == 3 else 1) if guided else None

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not guided:
            return net(x, t, cond)
        both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null.to(cond.dtype), cond]))
        v_uncond, v_cond = both.chunk(2)
        return obj.cfg_mix(v_uncond, v_cond, cfg_scale)

    return obj.euler_sample(velocity, noise, steps=steps, shift=shift)


def write_meshes(grids: list[np.ndarray], out_dir: Path, prefix: str, fmt: str = "obj",
                 preview: bool = True) -> tuple[list[Path], list[Any]]:
    """Marching cubes on each grid; writes meshes (+ PNG previews); returns (files, meshes)."""
    files, meshes = [], []
    for i, grid in enumerate(grids):
        mesh = meshing.grid_to_mesh(grid)
        meshes.append(mesh)
        if mesh is not None:
            files.append(meshing.save_mesh(mesh, out_dir / f"{prefix}_{i:02d}.{fmt}"))
        if preview:
            files.append(meshing.save_preview(mesh, out_dir / f"{prefix}_{i:02d}.png", f"{prefix} {i}"))
    return files, meshes


# ---------------------------------------------------------------------------
# the evaluator used by the loop
# ---------------------------------------------------------------------------

class Evaluator:
    def __init__(self, cfg: TrainConfig, task, engine, tracker, make_loader):
        self.cfg, self.task, self.engine, self.tracker = cfg, task, engine, tracker
        self.make_loader = make_loader
        self.run_dir = Path(cfg.run.dir)
        self._batch: dict[str, Any] | None = None

    def flush_plots(self) -> None:
        if self.engine.is_main:
            self.tracker.log_loss_curve(self.run_dir / "plots")

    def run(self, step: int, ema) -> dict[str, float]:
        """Evaluate on rank 0 (collective: every rank calls it and waits)."""
        metrics: dict[str, float] = {}
        net = self._ema_copy(ema)   # collective: sharded strategies gather the weights to rank 0
        if self.engine.is_main:
            out_dir = self.run_dir / "eval" / f"step_{step:08d}"
            metrics, files = self._vae(net, out_dir) if self.cfg.task == "vae" else self._dit(net, out_dir)
            metrics = {f"eval/{k}": v for k, v in metrics.items()}
            self.tracker.log_metrics(metrics, step)
            for path in files:
                self.tracker.log_artifact(path, f"eval/step_{step:08d}")
            self.flush_plots()
        self.engine.barrier()
        return metrics

    def _ema_copy(self, ema) -> nn.Module | None:
        """A full copy of the network with the EMA weights on rank 0 (None elsewhere)."""
        state = self.engine.full_state_dict(ema)
        if state is None:
            return None
        net = models.build_from_config(copy.deepcopy(self.task.net.config)).to(self.engine.device)
        prefix = "net."
        net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        return net.eval()

    def _fixed_batch(self) -> dict[str, Any]:
        """The same training samples at every evaluation (first batch of a loader with its own seed)."""
        if self._batch is None:
            loader = self.make_loader(seed_offset=2)
            batch = next(iter(loader))
            n = self.cfg.eval.num_samples
            self._batch = {k: v[:n] for k, v in batch.items() if k != "num_tokens"}
        return to_device(self._batch, self.engine.device)

    @torch.no_grad()
    def _vae(self, net: nn.Module, out_dir: Path) -> tuple[dict[str, float], list[Path]]:
        batch, ev, kind = self._fixed_batch(), self.cfg.eval, self.cfg.vae_loss.kind
        if isinstance(net, models.VoxelVAE):
            latents = net.encode(batch["occ"]).mode()
            grids = decode_grids(net, latents, kind=kind, resolution=0, chunk=ev.query_chunk)
            iou = obj.volume_iou(torch.from_numpy(np.stack(grids)).flatten(1),
                                 torch.where(batch["occ"][:, 0] > 0.5, -1.0, 1.0).cpu().flatten(1))
        else:
            latents = net.encode(batch["surface"], batch["surface_normal"], batch.get("sharp"),
                                 batch.get("sharp_normal")).mode()
            pred = as_sdf(net.query(net.decode(latents), batch["query"]), kind)
            iou = obj.volume_iou(pred, batch["sdf"])
            # the loader puts the uniform volume queries first: their IoU is the usual volume IoU
            num_vol = self.task.loader_options().get("num_vol", VaeOptions.num_vol)
            iou_vol = obj.volume_iou(pred[:, :num_vol], batch["sdf"][:, :num_vol])
            grids = decode_grids(net, latents, kind=kind, resolution=ev.grid_resolution, chunk=ev.query_chunk)
        files, meshes = write_meshes(grids, out_dir, "recon")
        metrics = {"iou": float(iou.mean())}                      # all queries (volume + near-surface)
        if not isinstance(net, models.VoxelVAE):
            metrics["iou_vol"] = float(iou_vol.mean())
        if "surface" in batch and batch["surface"].shape[1] > 1:
            scores = [obj.chamfer_and_fscore(meshing.surface_points(m, 4096), batch["surface"][i].cpu(),
                                             ev.fscore_threshold) for i, m in enumerate(meshes)]
            metrics["chamfer"] = float(np.mean([s["chamfer"] for s in scores]))
            metrics["fscore"] = float(np.mean([s["fscore"] for s in scores]))
        return metrics, files

    @torch.no_grad()
    def _dit(self, net: nn.Module, out_dir: Path) -> tuple[dict[str, float], list[Path]]:
        task, ev = self.task, self.cfg.eval
        if task.vae is None:
            return {}, []  # cached latents without a VAE checkpoint: nothing to decode
        x0 = task.latents(self._fixed_batch(), None)                   # shape template (and references)
        n = ev.num_samples
        gen = torch.Generator().manual_seed(self.cfg.run.seed)
        noise = torch.randn(n, *x0.shape[1:], generator=gen).to(self.engine.device)
        cond = self._eval_condition(n)
        sampled = euler_with_cfg(net, noise, cond, steps=ev.sample_steps, shift=self.cfg.flow_loss.t_shift,
                                 cfg_scale=ev.cfg_scale) / task.scale_factor
        grids = decode_grids(task.vae, sampled, kind=task.vae_cfg.vae_loss.kind, resolution=ev.grid_resolution,
                             chunk=ev.query_chunk)
        files, meshes = write_meshes(grids, out_dir, "sample")
        nearest = torch.cdist(sampled.flatten(1).float(), x0.flatten(1).float() / 1.0).min(dim=1).values
        metrics = {"nonempty": float(np.mean([m is not None for m in meshes])),
                   "latent_nn_dist": float(nearest.mean())}
        return metrics, files

    def _eval_condition(self, n: int) -> torch.Tensor | None:
        kind = self.cfg.condition.kind
        if kind == "class":
            return torch.arange(n, device=self.engine.device) % self.cfg.condition.num_classes
        if kind == "embedding":
            return self.task.condition(self._fixed_batch())[:n]
        return None
