"""Task-specific training steps: what one micro-batch does for the VAE and for the DiT.

The generic loop (trainer/loop.py) never looks inside a batch. A task gives it:

* ``objective``: an ``nn.Module`` holding the trained network whose ``forward`` computes the loss,
  so the engine can wrap it (DDP today, DeepSpeed / FSDP2 later) and every strategy sees one forward;
* ``loader_options()``: the task options for ``data_pipeline.make_loader``;
* ``compute(model, batch, rand, step)``: (loss tensor, float metrics) for one micro-batch;
* ``derived()`` / ``restore(derived)``: values measured at the start of a run (e.g. the latent scale
  factor) that a checkpoint stores so a resumed run uses the same ones.

:class:`Task` states that interface; :class:`VaeTask` and :class:`DitTask` implement it. Encoding,
conditions and the frozen VAE come from trainer/inference.py, shared with sampling and evaluation.

Randomness (posterior noise, t, eps, condition dropout) comes from :class:`BatchRandom`, which draws
for the *global* batch from a generator seeded by (seed, step, micro-step) and hands each rank its
rows: results do not depend on the number of ranks, and a resumed run draws the same numbers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor, nn

import models
from data_pipeline.typed_config import ConfigError
from trainer import objectives as obj
from trainer.config import TrainConfig
from trainer.inference import (
    as_sdf,
    batch_condition,
    encode,
    latent_scale_factor,
    load_run_vae,
    make_image_encoder,
    network_spec,
    read_network,
    vae_point_counts,
)


class BatchRandom:
    """Random draws for one micro-step of the global batch; this rank gets rows [rank*B, (rank+1)*B)."""

    def __init__(self, seed: int, step: int, micro: int, rank: int, world_size: int, local_batch: int,
                 device: torch.device):
        words = np.random.SeedSequence([seed, step, micro, 0x5EED]).generate_state(2)
        self.gen = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
        self.rows = slice(rank * local_batch, (rank + 1) * local_batch)
        self.total = world_size * local_batch
        self.device = device

    def normal(self, *shape: int) -> Tensor:
        """[B, *shape] standard normal."""
        return torch.randn(self.total, *shape, generator=self.gen)[self.rows].to(self.device)

    def times(self, m: float, s: float, shift: float) -> Tensor:
        return obj.sample_logit_normal_t(self.total, m=m, s=s, shift=shift, generator=self.gen)[self.rows].to(self.device)

    def dropout(self, p: float) -> Tensor:
        return obj.condition_dropout_mask(self.total, p, generator=self.gen)[self.rows].to(self.device)


class Task(Protocol):
    """What the loop, the evaluator and the engines need from a training task."""

    cfg: TrainConfig
    net: nn.Module | None          # the trained network (None for a DiT until prepare() built it)
    objective: nn.Module | None    # holds ``net`` as ``.net``; its forward computes the loss

    def loader_task(self) -> str: ...

    def loader_options(self, evaluation: bool = False) -> dict[str, Any]: ...

    def prepare(self, make_loader: Callable[..., Any], engine: Any) -> None: ...

    def derived(self) -> dict[str, Any]: ...

    def restore(self, derived: dict[str, Any]) -> None: ...

    def compute(self, model: nn.Module, batch: dict[str, Any], rand: BatchRandom,
                step: int) -> tuple[Tensor, dict[str, float]]: ...


def family(name: str) -> str:
    return name.partition("/")[0]


def build_network(name: str, overrides: dict[str, Any], checkpoint_every: int = 0) -> nn.Module:
    """The model section's network, with activation checkpointing on every ``checkpoint_every``-th block."""
    try:
        net = models.build(name, **overrides)
    except ValueError as err:
        raise ConfigError(f"model.name/model.overrides: {err}") from None
    if checkpoint_every:
        net.set_activation_checkpointing(checkpoint_every)
    return net


def apply_init_from(cfg: TrainConfig) -> None:
    """model.init_from=FILE: the network's architecture is the file's (name + overrides, e.g. an
    imported release), ``model.overrides`` on top. Weights load in init_weights."""
    if not cfg.model.init_from:
        return
    _, file_cfg, meta = read_network(cfg.model.init_from)
    name, overrides = network_spec(file_cfg, meta)
    if family(name) != family(cfg.model.name):
        raise ConfigError(f"model.init_from: {cfg.model.init_from} holds a {name}, but model.name is {cfg.model.name}")
    cfg.model.name, cfg.model.overrides = name, {**overrides, **cfg.model.overrides}


def init_weights(net: nn.Module, cfg: TrainConfig) -> None:
    """Weights only (the optimizer starts fresh) from model.init_from; a resumed run overwrites them."""
    if not cfg.model.init_from:
        return
    missing, unexpected = net.load_state_dict(read_network(cfg.model.init_from)[0], strict=False)
    if missing or unexpected:
        raise ConfigError(f"model.init_from: {cfg.model.init_from} does not fit {cfg.model.name} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------

def vecset_token_counts(cfg: models.VecSetVAEConfig, batch: dict[str, Any]) -> tuple[int, int]:
    """(uniform, sharp) query-token counts; a drawn ``num_tokens`` scales both in proportion."""
    uniform, sharp = cfg.num_latents, cfg.num_sharp_latents if "sharp" in batch else 0
    if "num_tokens" in batch:
        total = int(batch["num_tokens"])
        scale = min(1.0, total / (uniform + sharp))
        uniform, sharp = max(1, round(uniform * scale)), round(sharp * scale)
    return uniform, sharp


class VaeObjective(nn.Module):
    """Reconstruction + KL for the VecSet or voxel VAE; ``forward`` returns loss terms and metrics."""

    def __init__(self, net: nn.Module, cfg: TrainConfig):
        super().__init__()
        self.net = net
        self.cfg, self.loss_cfg = cfg, cfg.vae_loss
        self.voxel = isinstance(net, models.VoxelVAE)

    def forward(self, batch: dict[str, Any], noise: Tensor, kl_weight: float,
                counts: tuple[int, int] | None = None) -> dict[str, Tensor]:
        posterior = encode(self.net, self.cfg, batch, counts)
        if self.voxel:
            pred = self.net.decode(posterior.mean + posterior.std * noise).squeeze(1)   # [B, R, R, R] logits
            inside = batch["occ"].squeeze(1) > 0.5
            terms = obj.occupancy_bce_loss(pred.flatten(1), inside.flatten(1))
            sdf_pred, sdf_true = -pred.flatten(1), torch.where(inside, -1.0, 1.0).flatten(1)
        else:
            hidden = self.net.decode(posterior.mean + posterior.std * noise)
            pred = self.net.query(hidden, batch["query"])                              # [B, Q]
            terms = self._recon(pred, batch["sdf"])
            if self.loss_cfg.eikonal_weight > 0:
                terms["eikonal"] = self._eikonal(hidden, batch["query"], batch["sdf"])
                terms["recon"] = terms["recon"] + self.loss_cfg.eikonal_weight * terms["eikonal"]
            sdf_pred, sdf_true = as_sdf(pred, self.loss_cfg.kind), batch["sdf"]
        kl = posterior.kl().mean()
        terms.update(kl=kl, loss=terms["recon"] + kl_weight * kl,
                     iou=obj.volume_iou(sdf_pred.detach(), sdf_true).mean())
        return terms

    def _recon(self, pred: Tensor, sdf: Tensor) -> dict[str, Tensor]:
        if self.loss_cfg.kind == "sdf":
            return obj.sdf_regression_loss(pred, sdf, self.loss_cfg.tau)
        return obj.occupancy_bce_loss(pred, sdf < 0)

    def _eikonal(self, hidden: Tensor, query: Tensor, sdf: Tensor, count: int = 256, h: float = 1e-3) -> Tensor:
        """Eikonal term by central differences (no double backward, so every strategy can run it).
        The prediction is in truncated units, so its gradient norm should be 1 / tau inside the
        band |sdf| < tau, and only there (beyond it the target is flat)."""
        pts, in_band = obj.eikonal_points(query, sdf, self.loss_cfg.tau, count)  # [B, P, 3], [B, P]
        offsets = torch.eye(3, device=pts.device, dtype=pts.dtype) * h  # [3, 3]
        probe = torch.cat([pts[:, :, None] + offsets, pts[:, :, None] - offsets], dim=2)  # [B, P, 6, 3]
        values = self.net.query(hidden, probe.flatten(1, 2)).view(*pts.shape[:2], 2, 3)
        grad = (values[:, :, 0] - values[:, :, 1]) / (2 * h)            # [B, P, 3]
        return obj.eikonal_loss(grad, 1.0 / self.loss_cfg.tau, in_band)


class VaeTask:
    def __init__(self, cfg: TrainConfig):
        if family(cfg.model.name) not in ("vecset_vae", "voxel_vae"):
            raise ConfigError(f"model.name: task=vae needs a vecset_vae/* or voxel_vae/* model, got {cfg.model.name}")
        self.cfg = cfg
        self.net = build_network(cfg.model.name, cfg.model.overrides, cfg.model.activation_checkpointing)
        init_weights(self.net, cfg)
        self.objective = VaeObjective(self.net, cfg)
        self.voxel = self.objective.voxel
        if self.voxel and cfg.vae_loss.kind != "occupancy":
            raise ConfigError("vae_loss.kind: the voxel VAE is trained on occupancy grids: set vae_loss.kind=occupancy")

    def loader_task(self) -> str:
        return "vae"

    def loader_options(self, evaluation: bool = False) -> dict[str, Any]:
        if self.voxel:  # the grid is the input and the target; point queries are not needed
            return {"occupancy": True, "num_vol": 0, "num_near": 0, "num_surface": 1, **self.cfg.data.options}
        mc = self.net.config  # training resamples points; only the query tokens need an FPS order
        return {"num_fps": mc.num_latents, "num_sharp_fps": mc.num_sharp_latents, **self.cfg.data.options,
                **vae_point_counts(self.cfg, self.net)}

    def derived(self) -> dict[str, Any]:
        return {}

    def restore(self, derived: dict[str, Any]) -> None:
        pass

    def prepare(self, make_loader, engine) -> None:
        """Nothing to measure for the VAE."""

    def compute(self, model: nn.Module, batch: dict[str, Any], rand: BatchRandom, step: int):
        c = self.net.config.latent_channels
        if self.voxel:  # the latent grid of an [B, 1, D, H, W] occupancy grid (any box, not only cubes)
            f = self.net.config.downsample_factor
            noise, counts = rand.normal(c, *(n // f for n in batch["occ"].shape[-3:])), None
        else:
            counts = vecset_token_counts(self.net.config, batch)
            noise = rand.normal(sum(counts), c)
        kl_w = obj.kl_weight(step, self.cfg.vae_loss.kl_weight, self.cfg.vae_loss.kl_warmup_steps)
        terms = model(batch, noise, kl_w, counts)
        metrics = {k: float(v.detach()) for k, v in terms.items()}
        return terms["loss"], metrics


# ---------------------------------------------------------------------------
# DiT
# ---------------------------------------------------------------------------

class DitObjective(nn.Module):
    """Rectified-flow loss; ``forward`` returns the per-sample loss [B] (logged per t bin)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x0: Tensor, eps: Tensor, t: Tensor, cond: Tensor | None, drop: Tensor) -> Tensor:
        if cond is not None:
            cond = self.net.drop_condition(cond, drop)
        pred = self.net(obj.interpolate(x0, eps, t), t, cond)
        return obj.flow_loss_per_sample(pred, obj.velocity_target(x0, eps))


def dit_surface_options(vae_cfg: TrainConfig, vae: nn.Module) -> dict[str, Any]:
    """The DiT's encoder input: the points its VecSet VAE was trained on (every token type it has)."""
    sampling = vae_cfg.data.options.get("surface_sampling")
    return {**vae_point_counts(vae_cfg, vae), **({"surface_sampling": sampling} if sampling else {})}


SCALE_STREAM = 1 << 20   # BatchRandom micro-step ids of the scale-factor batches (apart from training's)


class DitTask:
    def __init__(self, cfg: TrainConfig, device: torch.device):
        if family(cfg.model.name) not in ("vecset_dit", "voxel_dit"):
            raise ConfigError(f"model.name: task=dit needs a vecset_dit/* or voxel_dit/* model, got {cfg.model.name}")
        self.cfg, self.device = cfg, device
        self.vae, self.vae_cfg = (None, None)
        if cfg.vae.checkpoint:
            self.vae, self.vae_cfg = load_run_vae(cfg, device)
        self.voxel = family(cfg.model.name) == "voxel_dit"
        if self.vae is not None and self.voxel != isinstance(self.vae, models.VoxelVAE):
            raise ConfigError(f"vae.checkpoint: a {cfg.model.name} needs a {'voxel' if self.voxel else 'vecset'} VAE")
        self.scale_factor: float | None = cfg.vae.scale_factor
        if self.scale_factor is None and cfg.vae.checkpoint:   # an imported release carries its anchor's scale
            self.scale_factor = latent_scale_factor(cfg.vae.checkpoint)
        self.model_overrides: dict[str, Any] | None = None
        self.latent_shape: list[int] | None = None   # one sample's latent shape (what the sampler draws)
        self.net: nn.Module | None = None
        self.objective: nn.Module | None = None
        self.encoder = make_image_encoder(cfg, device)   # frozen DINOv2 (condition.kind=image) or None

    # -- data -----------------------------------------------------------------
    def loader_options(self, evaluation: bool = False) -> dict[str, Any]:
        """Options of the dit loader; ``evaluation``: a fixed condition view (condition.eval_view)."""
        opts: dict[str, Any] = {}
        if self.cfg.vae.latents == "cached":
            opts["use_latents"] = True
        elif self.voxel:  # the frozen voxel VAE encodes the occupancy grid; one surface point is the minimum
            opts = {"occupancy": True, "num_surface": 1}
        else:
            opts = dit_surface_options(self.vae_cfg, self.vae)
        cond = self.cfg.condition
        if cond.kind != "none":
            opts["condition"] = cond.kind
        if cond.kind == "image" and evaluation:
            opts["view"] = cond.eval_view
        elif cond.kind == "image" and cond.train_views is not None:
            opts["views"] = list(cond.train_views)
        return {**opts, **self.cfg.data.options}

    def loader_task(self) -> str:
        return "dit"

    @torch.no_grad()
    def latents(self, batch: dict[str, Any], rand: BatchRandom | None) -> Tensor:
        """Unscaled data latents x0 of a batch: cached, or encoded by the frozen VAE (mode or a sample)."""
        if self.cfg.vae.latents == "cached":
            return batch["latent"].float()
        posterior = encode(self.vae, self.vae_cfg, batch)
        if self.cfg.vae.latents == "sample" and rand is not None:
            return posterior.mean + posterior.std * rand.normal(*posterior.mean.shape[1:])
        return posterior.mode()

    # -- derived values ---------------------------------------------------------
    def prepare(self, make_loader, engine) -> None:
        """Measure the latent scale factor (1 / std over a few batches, averaged over ranks) and
        derive the network's shape from the latents; then build the network."""
        if self.model_overrides is None or self.scale_factor is None or self.latent_shape is None:
            loader = make_loader(seed_offset=1)
            batches = [to_device(b, self.device) for b, _ in zip(loader, range(self.cfg.vae.scale_batches))]
            lat = self.measured_latents(batches, engine.rank, engine.world_size)
            stats = engine.all_reduce_mean({"mean": float(lat.mean()), "sq": float(lat.pow(2).mean())})
            std = max(stats["sq"] - stats["mean"] ** 2, 1e-12) ** 0.5
            if self.scale_factor is None:
                self.scale_factor = 1.0 / std
            if self.model_overrides is None:
                self.model_overrides = self._derive_overrides(lat)
            self.latent_shape = list(lat.shape[1:])
        self._build()

    def measured_latents(self, batches: list[dict[str, Any]], rank: int, world_size: int) -> Tensor:
        """[sum B, ...] latents the scale factor is measured on: the ones training feeds the DiT
        (posterior samples for vae.latents=sample, whose std includes the posterior noise)."""
        rands = [BatchRandom(self.cfg.run.seed, 0, SCALE_STREAM + i, rank, world_size, len(b["id"]), self.device)
                 for i, b in enumerate(batches)]
        return torch.cat([self.latents(b, r) for b, r in zip(batches, rands)])

    def _derive_overrides(self, lat: Tensor) -> dict[str, Any]:
        derived: dict[str, Any] = {"in_channels": int(lat.shape[1] if self.voxel else lat.shape[-1])}
        if self.voxel:
            derived["resolution"] = int(lat.shape[-1])
        kind = self.cfg.condition.kind
        derived["condition"] = {"none": "none", "class": "class"}.get(kind, "tokens")
        if kind == "class":
            derived["num_classes"] = self.cfg.condition.num_classes
        if kind == "image":
            derived["condition_dim"] = self.encoder.dim
        for key, value in derived.items():
            given = self.cfg.model.overrides.get(key)
            if given is not None and given != value:
                raise ConfigError(f"model.overrides.{key}: {given!r} contradicts the data/VAE ({value!r})")
        return {**derived, **self.cfg.model.overrides}

    def _build(self) -> None:
        self.net = build_network(self.cfg.model.name, self.model_overrides, self.cfg.model.activation_checkpointing)
        init_weights(self.net, self.cfg)
        self.objective = DitObjective(self.net)

    def derived(self) -> dict[str, Any]:
        return {"scale_factor": self.scale_factor, "model_overrides": self.model_overrides,
                "latent_shape": self.latent_shape}

    def restore(self, derived: dict[str, Any]) -> None:
        self.scale_factor = derived["scale_factor"]
        self.model_overrides = derived["model_overrides"]
        self.latent_shape = derived.get("latent_shape")

    # -- one micro-step -----------------------------------------------------------
    def compute(self, model: nn.Module, batch: dict[str, Any], rand: BatchRandom, step: int):
        fl = self.cfg.flow_loss
        x0 = self.latents(batch, rand) * self.scale_factor
        eps = rand.normal(*x0.shape[1:])
        t = rand.times(fl.t_mean, fl.t_std, fl.t_shift)
        drop = rand.dropout(self.cfg.condition.p_uncond)
        per_sample = model(x0, eps, t, batch_condition(self.cfg.condition, batch, self.encoder), drop)
        loss = per_sample.mean()
        metrics = {"loss": float(loss.detach())}
        bins = obj.loss_per_t_bin(per_sample, t, fl.t_bins)
        for b in range(fl.t_bins):  # every bin, so all ranks report the same keys
            total, count = bins.get(b, (0.0, 0))
            metrics[f"loss_t{b}_sum"], metrics[f"loss_t{b}_n"] = total, float(count)
        return loss, metrics


def make_task(cfg: TrainConfig, device: torch.device) -> Task:
    apply_init_from(cfg)
    return VaeTask(cfg) if cfg.task == "vae" else DitTask(cfg, device)


def network_config_dict(net: nn.Module) -> dict[str, Any]:
    return dataclasses.asdict(net.config)
