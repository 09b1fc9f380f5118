"""The ``fsdp2`` strategy: torch.distributed.fsdp.fully_shard per block, then the root.

Every block of the network's ``CheckpointedBlocks`` lists becomes one FSDP unit (its parameters are
all-gathered just before it runs and, with ``engine.reshard_after_forward``, freed again right after
its forward); the remaining parameters (embedders, heads) belong to the root unit. Parameters,
gradients and AdamW state are DTensors sharded on dim 0 over the ranks, so each rank holds about
1 / world of them. With ``precision=bf16`` the blocks compute with bf16 copies of the weights
(MixedPrecisionPolicy; gradients are reduced in fp32) and the loop's autocast still covers the ops
between blocks; the root does not cast its inputs, so data (coordinates, SDF targets) stays fp32.

Checkpoints use torch.distributed.checkpoint (DCP) in ``<checkpoint>/dcp/``: one file per rank plus
``.metadata``, holding the model, the optimiser state and the EMA as DTensors. DCP reshards on load,
so a checkpoint written by N ranks resumes on M ranks (including one process, which runs FSDP2 over
a one-rank group) and converts to a full state dict without any process group (trainer/commands/export.py).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from models.layers import CheckpointedBlocks
from trainer.ema import EMA
from trainer.engines.base import Engine, OptimizerFactory, SchedulerFactory

DCP_DIR = "dcp"


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks that become their own FSDP unit (every block of every CheckpointedBlocks)."""
    return [block for m in model.modules() if isinstance(m, CheckpointedBlocks) for block in m.blocks]


def ema_as_dtensors(ema: EMA) -> dict[str, torch.Tensor]:
    """The EMA shards wrapped as DTensors laid out like their parameters (so DCP can reshard them)."""
    out = {}
    for name, p, shadow in zip(ema.names, ema.params, ema.shadow):
        if isinstance(p, DTensor):
            out[name] = DTensor.from_local(shadow, p.device_mesh, p.placements, run_check=False,
                                           shape=p.shape, stride=p.stride())
        else:
            out[name] = shadow
    return out


def dcp_has_ema(directory: Path) -> bool:
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(directory / DCP_DIR)).read_metadata().state_dict_metadata
    return any(k.startswith("ema.") for k in keys)


def read_full_state(directory: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    """Full model tensors (EMA over the trained ones when asked) from a DCP checkpoint, in one process
    and without a process group; the optimiser state is not read."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = directory / DCP_DIR
    metadata = FileSystemReader(str(path)).read_metadata()
    wanted = ("model", "ema") if use_ema else ("model",)
    state: dict[str, dict[str, torch.Tensor]] = {group: {} for group in wanted}
    for key, info in metadata.state_dict_metadata.items():
        group, _, name = key.partition(".")
        if group in state and isinstance(info, TensorStorageMetadata):
            state[group][name] = torch.empty(info.size, dtype=info.properties.dtype)
    dcp.load(state, checkpoint_id=path, no_dist=True)
    return {**state["model"], **state.get("ema", {})}


class FSDP2Engine(Engine):
    strategy = "fsdp2"
    needs_group = True

    def prepare(self, model: nn.Module, make_optimizer: OptimizerFactory,
                make_scheduler: SchedulerFactory) -> nn.Module:
        model = self.compile(model.to(self.device))   # blocks' forward only: FSDP hooks stay eager
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        bf16 = self.precision == "bf16"
        block_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                            reduce_dtype=torch.float32 if bf16 else None)
        root_policy = MixedPrecisionPolicy(param_dtype=block_policy.param_dtype,
                                           reduce_dtype=block_policy.reduce_dtype, cast_forward_inputs=False)
        self._broadcast_from_rank0(model)
        reshard = self.cfg.reshard_after_forward
        for block in shard_units(model):
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=block_policy)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=root_policy)
        self.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        self.scheduler = make_scheduler(self.optimizer)
        self.model = model
        return model

    @property
    def module(self) -> nn.Module:
        return self.model

    def _broadcast_from_rank0(self, model: nn.Module) -> None:
        """fully_shard keeps each rank's own slice of its own tensors: start every rank from rank 0's
        weights (as DDP and DeepSpeed do), whatever each rank's random initialisation was."""
        if self.world_size > 1:
            with torch.no_grad():
                for t in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(t.data, src=0)

    def accumulate(self, sync: bool):
        # Gradients of non-final micro-steps stay unsharded and local; the last one reduce-scatters all.
        self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    # -- state ------------------------------------------------------------------
    def _dcp_state(self, ema: EMA | None) -> dict:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        if ema is not None:
            state["ema"] = ema_as_dtensors(ema)
        return state

    def save_state(self, directory: Path, ema: EMA | None) -> list[str]:
        dcp.save(self._dcp_state(ema), checkpoint_id=directory / DCP_DIR)
        if self.is_main:
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
        return ["scheduler.pt", f"{DCP_DIR}/.metadata"] + [f"{DCP_DIR}/__{r}_0.distcp" for r in range(self.world_size)]

    def load_state(self, directory: Path, ema: EMA | None) -> None:
        state = self._dcp_state(ema)
        dcp.load(state, checkpoint_id=directory / DCP_DIR)   # reshards when the world size differs
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        if ema is not None:
            loaded = state["ema"]
            for i, name in enumerate(ema.names):
                t = loaded[name]
                ema.shadow[i].copy_(t.to_local() if isinstance(t, DTensor) else t)

    def full_state_dict(self, ema: EMA | None = None) -> dict[str, torch.Tensor] | None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)       # all-gathers; rank 0 keeps it
        if ema is not None:
            for name, t in ema_as_dtensors(ema).items():
                full = t.full_tensor() if isinstance(t, DTensor) else t  # collective: every rank calls it
                if self.is_main:
                    state[name] = full.cpu()
        # one rank: the "full" tensors are the parameters' own storage; copy so training cannot change them
        return {k: v.clone() for k, v in state.items()} if self.is_main else None
