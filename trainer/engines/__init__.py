"""The one seam between the training loop and torch.distributed / DeepSpeed / FSDP2.

:mod:`.base` holds the :class:`Engine` interface, launch detection and process-group set-up;
:mod:`.ddp` the default engine (DDP, or one plain process), :mod:`.deepspeed` ZeRO-1/2/3 and
:mod:`.fsdp` ``fully_shard`` per block. This package chooses among them; the strategy modules are
imported only when chosen, and nothing outside ``trainer/engines/`` imports DeepSpeed or FSDP.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.config import SUPPORTED_STRATEGIES, EngineConfig, OptimConfig, require_strategy_package
from trainer.engines.base import (
    DistributedSetupError,
    Engine,
    OptimizerFactory,
    SchedulerFactory,
    describe_peer_failure,
    detect_launch,
    shutdown_process_group,
)
from trainer.engines.resolve import resolve_engine, resolve_run_config

__all__ = ["DistributedSetupError", "Engine", "OptimizerFactory", "SchedulerFactory", "checkpoint_has_ema",
           "create_engine", "describe_peer_failure", "detect_launch", "read_full_state", "resolve_engine_config",
           "resolve_run_config", "shutdown_process_group"]


def read_full_state(directory: Path, strategy: str, use_ema: bool) -> dict[str, torch.Tensor]:
    """The whole model's tensors from a checkpoint written by ``strategy`` (EMA over the trained
    weights when asked and saved), consolidated in this one process on the CPU."""
    if strategy == "deepspeed":
        from trainer.engines.deepspeed import read_full_state as read
    elif strategy == "fsdp2":
        from trainer.engines.fsdp import read_full_state as read
    else:
        from trainer.engines.ddp import read_full_state as read
    return read(Path(directory), use_ema)


def checkpoint_has_ema(directory: Path, meta: dict[str, Any]) -> bool:
    if meta.get("strategy") == "fsdp2":
        from trainer.engines.fsdp import dcp_has_ema
        return dcp_has_ema(Path(directory))
    return any(f == "ema.pt" or f.startswith("ema_rank_") for f in meta.get("files", []))


def resolve_engine_config(cfg: EngineConfig, env: dict[str, str] | None = None) -> EngineConfig:
    """``cfg`` with every engine setting concrete (see trainer/engines/resolve.py)."""
    return resolve_engine(cfg, env)[0]


def create_engine(cfg: EngineConfig, precision: str, optim: OptimConfig | None = None) -> Engine:
    """The engine for ``cfg.strategy`` (or for the strategy an accelerate config asks for); a config
    already resolved by :func:`resolve_run_config` resolves to itself."""
    cfg = resolve_engine_config(cfg)
    if cfg.strategy not in SUPPORTED_STRATEGIES:
        from data_pipeline.typed_config import ConfigError
        raise ConfigError(f"engine.strategy: {cfg.strategy!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_STRATEGIES)})")
    require_strategy_package(cfg.strategy)   # the strategy may come from an accelerate config
    if cfg.strategy == "deepspeed":
        from trainer.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(cfg, precision, optim)
    if cfg.strategy == "fsdp2":
        from trainer.engines.fsdp import FSDP2Engine
        return FSDP2Engine(cfg, precision, optim)
    from trainer.engines.ddp import DDPEngine
    return DDPEngine(cfg, precision, optim)
