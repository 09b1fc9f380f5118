"""The default engine: DistributedDataParallel over torch.distributed, or the plain module when there
is one process. Replicas are identical, so rank 0 writes full torch state dicts."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.ema import EMA
from trainer.engines.base import Engine, OptimizerFactory, SchedulerFactory


class DDPEngine(Engine):
    """DDP over torch.distributed, or a plain module when there is one process."""

    strategy = "ddp"

    # -- setup ----------------------------------------------------------
    def prepare(self, model: nn.Module, make_optimizer: OptimizerFactory,
                make_scheduler: SchedulerFactory) -> nn.Module:
        """Move, wrap and build the optimiser; returns the module to call for the forward pass."""
        model = self.compile(model.to(self.device))
        self.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        self.scheduler = make_scheduler(self.optimizer)
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        self.model = model
        return model

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (for EMA, evaluation and state dicts)."""
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def accumulate(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward + backward: gradients are all-reduced only when ``sync``."""
        if sync or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    # -- checkpoint state -------------------------------------------------
    def save_state(self, directory: Path, ema: EMA | None) -> list[str]:
        """Write model, optimiser, scheduler (and EMA) into ``directory``; returns the file names.

        DDP replicas are identical, so rank 0 writes full state dicts; sharded strategies write
        their native per-rank format here instead.
        """
        files = ["model.pt", "optimizer.pt", "scheduler.pt"] + (["ema.pt"] if ema else [])
        if self.is_main:
            torch.save(self.module.state_dict(), directory / "model.pt")
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
            if ema:
                torch.save(ema.state_dict(), directory / "ema.pt")
        return files

    def load_state(self, directory: Path, ema: EMA | None) -> None:
        load = lambda name: torch.load(directory / name, map_location=self.device, weights_only=True)  # noqa: E731
        self.module.load_state_dict(load("model.pt"))
        self.optimizer.load_state_dict(load("optimizer.pt"))
        self.scheduler.load_state_dict(load("scheduler.pt"))
        if ema:
            ema.load_state_dict(load("ema.pt"))


def read_full_state(directory: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    if use_ema and (directory / "ema.pt").exists():
        state.update(torch.load(directory / "ema.pt", map_location="cpu", weights_only=True))
    return state
