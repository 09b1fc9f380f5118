"""Evaluation during training (rank 0, EMA weights), built on trainer/inference.py.

At eval intervals rank 0 uses the EMA weights to
* VAE: reconstruct a fixed batch of training shapes: IoU on its query points, Chamfer / F-score of the
  marching-cubes surface against the stored surface points, meshes (.obj) and PNG previews;
* DiT: sample shapes with the guided Euler sampler, decode them with the frozen VAE, meshes and PNGs.
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
from trainer import checkpoint as ckpt
from trainer import inference, meshing
from trainer import objectives as obj
from trainer.config import TrainConfig
from trainer.tasks import Task, to_device


class Evaluator:
    def __init__(self, cfg: TrainConfig, task: Task, engine, tracker, make_loader):
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
            step_dir = ckpt.step_dir_name(step)
            out_dir = self.run_dir / "eval" / step_dir
            metrics, files = self._vae(net, out_dir) if self.cfg.task == "vae" else self._dit(net, out_dir)
            metrics = {f"eval/{k}": v for k, v in metrics.items()}
            self.tracker.log_metrics(metrics, step)
            for path in files:
                self.tracker.log_artifact(path, f"eval/{step_dir}")
            self.flush_plots()
        self.engine.barrier()
        return metrics

    def _ema_copy(self, ema) -> nn.Module | None:
        """A full copy of the network with the EMA weights on rank 0 (None elsewhere)."""
        state = self.engine.full_state_dict(ema)
        if state is None:
            return None
        net = models.build_from_config(copy.deepcopy(self.task.net.config)).to(self.engine.device)
        net.load_state_dict(ckpt.network_weights(state))
        return net.eval()

    def _fixed_batch(self) -> dict[str, Any]:
        """The same training samples at every evaluation (first batch of a loader with its own seed)."""
        if self._batch is None:
            loader = self.make_loader(seed_offset=2, evaluation=True)
            batch = next(iter(loader))
            n = self.cfg.eval.num_samples
            self._batch = {k: v[:n] for k, v in batch.items() if k != "num_tokens"}
        return to_device(self._batch, self.engine.device)

    @torch.no_grad()
    def _vae(self, net: nn.Module, out_dir: Path) -> tuple[dict[str, float], list[Path]]:
        batch, ev = self._fixed_batch(), self.cfg.eval
        rec = inference.reconstruct(net, self.cfg, batch, resolution=ev.grid_resolution, chunk=ev.query_chunk)
        files, meshes = inference.write_meshes(rec.grids, out_dir, "recon", inputs=inference.input_points(batch))
        metrics = {"iou": float(rec.iou.mean())}                  # all queries (volume + near-surface)
        if rec.pred is not None:
            # the loader puts the uniform volume queries first: their IoU is the usual volume IoU
            num_vol = self.task.loader_options().get("num_vol", VaeOptions.num_vol)
            metrics["iou_vol"] = float(obj.volume_iou(rec.pred[:, :num_vol], batch["sdf"][:, :num_vol]).mean())
        if "surface" in batch and batch["surface"].shape[1] > 1:
            scores = [inference.surface_scores(m, batch["surface"][i], ev.fscore_threshold, 4096)
                      for i, m in enumerate(meshes)]
            metrics["chamfer"] = float(np.mean([s["chamfer"] for s in scores]))
            metrics["fscore"] = float(np.mean([s["fscore"] for s in scores]))
        return metrics, files

    @torch.no_grad()
    def _dit(self, net: nn.Module, out_dir: Path) -> tuple[dict[str, float], list[Path]]:
        task, ev = self.task, self.cfg.eval
        if task.vae is None:
            return {}, []  # cached latents without a VAE checkpoint: nothing to decode
        batch = self._fixed_batch()
        x0 = task.latents(batch, None)                                 # shape template (and references)
        n = ev.num_samples
        gen = torch.Generator().manual_seed(self.cfg.run.seed)
        noise = torch.randn(n, *x0.shape[1:], generator=gen).to(self.engine.device)
        cond = inference.sampling_condition(self.cfg.condition, n, self.engine.device, batch=batch,
                                            encoder=task.encoder)
        sampled = inference.guided_euler(net, noise, cond, steps=ev.sample_steps, shift=self.cfg.flow_loss.t_shift,
                                         guidance=ev.guidance) / task.scale_factor
        grids = inference.decode_grids(task.vae, sampled, kind=task.vae_cfg.vae_loss.kind,
                                       resolution=ev.grid_resolution, chunk=ev.query_chunk)
        files, meshes = inference.write_meshes(grids, out_dir, "sample")
        if self.cfg.condition.kind == "image":      # the condition view beside the mesh sampled from it
            views = batch["view"][:n].cpu().numpy()
            files += [meshing.save_side_by_side([view, out_dir / f"sample_{i:02d}.png"],
                                                out_dir / f"condition_{i:02d}.png") for i, view in enumerate(views)]
        nearest = torch.cdist(sampled.flatten(1).float(), x0.flatten(1).float()).min(dim=1).values
        metrics = {"nonempty": float(np.mean([m is not None for m in meshes])),
                   "latent_nn_dist": float(nearest.mean())}
        return metrics, files
