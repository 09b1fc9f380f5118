"""The ``deepspeed`` strategy: ZeRO stage 1, 2 or 3, optionally with the optimiser state on the CPU.

The DeepSpeed JSON is ``engine.deepspeed_config`` or the bundled ``configs/deepspeed/zero<stage>.json``
(the files the accelerate configs point to); its ``"auto"`` fields are filled from the run config:
micro-batch 1 per rank (DeepSpeed never sees our loader), ``optim.grad_accum``, ``optim.clip_grad_norm``
and ``precision`` (bf16: DeepSpeed keeps bf16 weights and fp32 master weights in the optimiser; the
loop's autocast still runs, so fp32 inputs meet bf16 weights safely). Bucket sizes are capped at the
model's parameter count so a small model does not allocate gigabyte buffers.

The loop keeps owning accumulation and the learning-rate schedule: ``accumulate(sync)`` sets
DeepSpeed's accumulation boundary, ``backward`` does not rescale (the loop already divides), and the
scheduler (built on our AdamW, whose param groups ZeRO keeps) steps outside DeepSpeed, skipped or not.
DeepSpeed clips, and skips a step whose gradient norm is not finite (``was_step_applied``).

EMA: ZeRO-1/2 keep full parameters on every rank, so the EMA is a full fp32 copy (rank 0 saves it);
ZeRO-3 keeps a flat partition per parameter (``param.ds_tensor``, ceil(numel / world) elements, the
last rank zero-padded) and the EMA is an fp32 copy of exactly that partition: no communication. Each
rank saves its partitions in ``ema_rank_XXXXX.pt``; :func:`merge_partitions` rebuilds full tensors.

Checkpoints are DeepSpeed's own (``engine.save_checkpoint`` into ``<checkpoint>/deepspeed/``) plus
our scheduler and EMA files. On another number of ranks, rank 0 converts the checkpoint once into
DeepSpeed's universal format (``<checkpoint>/universal/``, ds_to_universal) and every rank loads
weights and optimiser state from it; the EMA partitions are merged and re-split by us.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import CONFIG_DIR
from trainer.ema import EMA
from trainer.engines.base import Engine, OptimizerFactory, SchedulerFactory

DS_TAG = "deepspeed"
UNIVERSAL_TAG = "universal"   # <checkpoint>/universal/: DeepSpeed's universal format, made on demand
BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")


def ema_partition_file(rank: int) -> str:
    return f"ema_rank_{rank:05d}.pt"


def deepspeed_config(base: dict[str, Any], *, stage: int, offload: str, precision: str, grad_accum: int,
                     clip_norm: float, world_size: int, num_params: int) -> dict[str, Any]:
    """``base`` (a DeepSpeed JSON) with our run's values in place of "auto" and the stage/offload asked for."""
    cfg = json.loads(json.dumps(base))
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=grad_accum,
               train_batch_size=grad_accum * world_size, gradient_clipping=float(clip_norm),
               steps_per_print=cfg.get("steps_per_print", 10**9),
               zero_allow_untested_optimizer=True,   # our torch AdamW (its param groups carry the schedule)
               zero_force_ds_cpu_optimizer=False)    # ... also with the optimiser state offloaded
    cfg["bf16"] = {**(cfg.get("bf16") or {}), "enabled": precision == "bf16"}
    cfg.pop("fp16", None)
    zero = dict(cfg.get("zero_optimization") or {})
    zero["stage"] = stage
    for key in BUCKET_KEYS:
        if key in zero:
            cap = -(-max(num_params, 1) // 4096) * 4096   # a multiple of ZeRO's alignment factors
            zero[key] = int(min(float(zero[key]), cap))
    if offload == "optimizer":
        zero["offload_optimizer"] = {**zero.get("offload_optimizer", {}), "device": "cpu",
                                     "pin_memory": torch.cuda.is_available()}
    else:
        zero.pop("offload_optimizer", None)
    cfg["zero_optimization"] = zero
    return cfg


def merge_partitions(parts: list[torch.Tensor], shape: torch.Size | list[int]) -> torch.Tensor:
    """Full tensor from ZeRO-3 style flat partitions (rank order, last one zero-padded)."""
    numel = math.prod(shape)
    return torch.cat([p.reshape(-1) for p in parts])[:numel].view(*shape)


def split_partition(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's ZeRO-3 style flat partition of ``full`` (ceil(numel / world) elements, zero-padded)."""
    size = math.ceil(full.numel() / world_size)
    flat = torch.zeros(size * world_size, dtype=full.dtype)
    flat[:full.numel()] = full.reshape(-1)
    return flat[rank * size:(rank + 1) * size].clone()


def read_ema_partitions(directory: Path) -> dict[str, torch.Tensor]:
    """Full EMA tensors from the per-rank ZeRO-3 EMA files of a checkpoint."""
    files = sorted(directory.glob("ema_rank_*.pt"))
    parts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    if not parts:
        raise FileNotFoundError(f"{directory}: no ema_rank_*.pt files")
    shapes = parts[0]["shapes"]
    return {name: merge_partitions([p["shards"][name] for p in parts], shape) for name, shape in shapes.items()}


def read_full_state(directory: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    """Full fp32 model tensors (zero_to_fp32 consolidation of the master weights), EMA over them when
    asked, from a DeepSpeed checkpoint of any stage, in one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = dict(get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DS_TAG))
    if use_ema and (directory / "ema.pt").exists():
        state.update(torch.load(directory / "ema.pt", map_location="cpu", weights_only=True))
    elif use_ema and (directory / ema_partition_file(0)).exists():
        state.update(read_ema_partitions(directory))
    return {k: v.detach().float() if v.is_floating_point() else v for k, v in state.items()}


class DeepSpeedEngine(Engine):
    strategy = "deepspeed"
    needs_group = True

    @property
    def stage(self) -> int:
        return self.cfg.zero_stage or 2

    def _base_config(self) -> dict[str, Any]:
        path = Path(self.cfg.deepspeed_config or CONFIG_DIR / "deepspeed" / f"zero{self.stage}.json")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"engine.deepspeed_config: cannot read {path}: {err}") from None

    def prepare(self, model: nn.Module, make_optimizer: OptimizerFactory,
                make_scheduler: SchedulerFactory) -> nn.Module:
        import deepspeed

        # DeepSpeed insists on LOCAL_RANK even for one process started without a launcher
        os.environ.setdefault("LOCAL_RANK", str(self.launch.local_rank))
        model = self.compile(model.to(self.device))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(trainable)
        self.scheduler = make_scheduler(optimizer)
        self.ds_config = deepspeed_config(
            self._base_config(), stage=self.stage, offload=self.cfg.offload, precision=self.precision,
            grad_accum=self.optim_cfg.grad_accum, clip_norm=self.optim_cfg.clip_grad_norm,
            world_size=self.world_size, num_params=sum(p.numel() for p in trainable))
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False)
        return self.model

    @property
    def module(self) -> nn.Module:
        return self.model.module

    @property
    def partitioned(self) -> bool:
        return self.stage == 3

    def named_local_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.module.named_parameters()

    def make_ema(self, decay: float) -> EMA:
        local = (lambda p: p.ds_tensor) if self.partitioned else (lambda p: p)  # noqa: E731
        return EMA(self.named_local_parameters(), decay, local=local)

    # -- one optimiser step -------------------------------------------------------
    def accumulate(self, sync: bool):
        self.model.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)   # the loop already divided by grad_accum

    def step(self, clip_norm: float, skip: bool = False) -> tuple[float, bool]:
        """DeepSpeed clips (gradient_clipping = optim.clip_grad_norm) and skips non-finite steps itself."""
        # A non-finite loss on any rank (skip) has already made the reduced gradients non-finite on
        # every rank, so ZeRO's own overflow check skips the update everywhere.
        self.model.step()
        applied = bool(self.model.was_step_applied()) and not skip
        norm = self.model.get_global_grad_norm()
        self.scheduler.step()
        self.zero_grad()
        return float(norm) if norm is not None else float("nan"), applied

    def zero_grad(self) -> None:
        self.model.zero_grad()

    # -- memory -----------------------------------------------------------------
    def local_tensors(self) -> dict[str, list[torch.Tensor]]:
        """ZeRO-3: the ds_tensor partitions; the fp32 master partitions and Adam moments of the optimiser."""
        params = list(self.module.parameters())
        if self.partitioned:   # partitions, plus any parameter ZeRO-3 keeps gathered (persistence threshold)
            params = [p.ds_tensor for p in params] + [p.data for p in params if p.data.numel() > 1]
        opt = self.optimizer
        states = [t for s in opt.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        masters = [t for g in opt.optimizer.param_groups for t in g["params"]]   # flat fp32 partitions
        if masters and masters[0].data_ptr() == (params[0].data_ptr() if params else -1):
            masters = []   # fp32 ZeRO-3 may train the partitions in place: do not count them twice
        return {"params": params, "optimizer": states + masters}

    # -- state ------------------------------------------------------------------
    def save_state(self, directory: Path, ema: EMA | None) -> list[str]:
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        # the universal-checkpoint marker lets ds_to_universal convert ZeRO-1/2 checkpoints too
        info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        self.model.save_checkpoint(str(directory), tag=DS_TAG, client_state=info, save_latest=False)
        if self.is_main:
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
        if ema is not None and self.partitioned:
            shapes = {name: list(p.ds_shape) for name, p in zip(ema.names, ema.params)}
            torch.save({"world_size": self.world_size, "shards": ema.state_dict(), "shapes": shapes},
                       directory / ema_partition_file(self.rank))
        elif ema is not None and self.is_main:
            torch.save(ema.state_dict(), directory / "ema.pt")
        self.barrier()
        files = sorted(str(p.relative_to(directory)) for p in (directory / DS_TAG).iterdir())
        files.append("scheduler.pt")
        if ema is not None:
            files += ([ema_partition_file(r) for r in range(self.world_size)] if self.partitioned else ["ema.pt"])
        return files

    def load_state(self, directory: Path, ema: EMA | None) -> None:
        meta = json.loads((directory / "meta.json").read_text())
        if meta["world_size"] == self.world_size:
            self.model.load_checkpoint(str(directory), tag=DS_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
        else:
            self._load_resharded(directory, meta["world_size"])
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        if ema is not None:
            self._load_ema(directory, ema)

    def _load_resharded(self, directory: Path, saved_world: int) -> None:
        """Another number of ranks: through DeepSpeed's universal checkpoint (weights and optimiser
        state, converted once by rank 0 into ``<checkpoint>/universal/``); if that conversion fails,
        the fp32 weights alone (zero_to_fp32) and a fresh optimiser state."""
        converted = self._convert_to_universal(directory) if self.is_main else None
        if not self.broadcast_object(converted):
            if self.is_main:
                print(f"[shapeflow] DeepSpeed checkpoint from {saved_world} ranks on {self.world_size}: universal "
                      "conversion failed; restoring the fp32 weights and EMA, the optimiser state starts fresh",
                      flush=True)
            self._load_weights_only(directory)
            return
        self.model._config.load_universal_checkpoint = True   # read by load_checkpoint and the ZeRO optimiser
        try:
            self.model.load_checkpoint(str(directory), tag=UNIVERSAL_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
        finally:
            self.model._config.load_universal_checkpoint = False

    @staticmethod
    def _convert_to_universal(directory: Path) -> bool:
        """``<checkpoint>/universal/`` from ``<checkpoint>/deepspeed/`` (DeepSpeed's ds_to_universal),
        written to a temporary name and renamed, so an interrupted conversion is never used."""
        target = directory / UNIVERSAL_TAG
        if target.is_dir():
            return True
        tmp = directory / f".{UNIVERSAL_TAG}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(directory / DS_TAG), "--output_folder", str(tmp), "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"[shapeflow] ds_to_universal failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        os.replace(tmp, target)
        return True

    def _load_weights_only(self, directory: Path) -> None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DS_TAG)
        self.load_full_state_dict(full)

    def load_full_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """Load a full fp32 state dict into the (possibly partitioned) model, and into ZeRO's fp32 masters."""
        import deepspeed

        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=self.partitioned):
                    if not self.partitioned or self.is_main:
                        p.data.copy_(full[name].to(p.dtype))
        self.optimizer.refresh_fp32_params()   # copy the (re-partitioned) weights into the fp32 masters

    def _load_ema(self, directory: Path, ema: EMA) -> None:
        if not self.partitioned:
            if (directory / "ema.pt").exists():
                ema.load_state_dict(torch.load(directory / "ema.pt", weights_only=True))
            else:   # saved by ZeRO-3 and resumed under ZeRO-1/2
                ema.load_state_dict(read_ema_partitions(directory))
            return
        own = directory / ema_partition_file(self.rank)
        saved = torch.load(own, weights_only=True) if own.exists() else None
        if saved is not None and saved["world_size"] == self.world_size:
            ema.load_state_dict(saved["shards"])
            return
        full = read_ema_partitions(directory) if saved is not None or (directory / "ema_rank_00000.pt").exists() \
            else torch.load(directory / "ema.pt", weights_only=True)
        ema.load_state_dict({name: split_partition(full[name], self.rank, self.world_size) for name in ema.names})

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.world_size == 1:
            return [t]
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return parts

    def full_state_dict(self, ema: EMA | None = None) -> dict[str, torch.Tensor] | None:
        import deepspeed

        state: dict[str, torch.Tensor] = {}
        for name, p in self.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], enabled=self.partitioned):
                if self.is_main:
                    state[name] = p.detach().float().cpu().clone()
        keys = set(self.module.state_dict().keys())   # ZeRO-3: empty tensors, but the right names
        for name, b in self.module.named_buffers():
            if self.is_main and name in keys:
                state[name] = b.detach().cpu().clone()
        if ema is not None:
            shadows = dict(zip(ema.names, ema.shadow))
            for name, p in zip(ema.names, ema.params):
                if not self.partitioned:
                    full = shadows[name]
                else:   # all-gather the partitions (only for evaluation and export, not per step)
                    full = merge_partitions(self._all_gather(shadows[name]), p.ds_shape)
                if self.is_main:
                    state[name] = full.cpu().clone()
        return state if self.is_main else None
