"""The engine interface, launch detection and process-group set-up shared by every strategy.

The loop only calls :class:`Engine` methods: ``prepare``, ``autocast``, ``backward``, ``step``,
``zero_grad``, ``save_state``/``load_state``, ``all_reduce_mean``, ``gather_objects``, ``barrier``.
Which strategy runs behind them is a config choice (``engine.strategy``): ``ddp`` in
trainer/engines/ddp.py (which is also the single process), ``deepspeed`` (ZeRO-1/2/3, optional
optimizer offload) in trainer/engines/deepspeed.py and ``fsdp2`` (``fully_shard`` per block) in
trainer/engines/fsdp.py. Only these modules import torch.distributed's wrappers, DeepSpeed or FSDP;
the loop, the objectives and the models are the same for every strategy.

Launchers are detected from the environment: a plain ``python``/``shapeflow`` process, ``torchrun``
(TORCHELASTIC_RUN_ID) and ``accelerate launch`` (ACCELERATE_* variables) all pass RANK / WORLD_SIZE /
MASTER_ADDR the same way, so one ``env://`` initialisation serves all three (srun jobs export them
from the launcher script). After initialisation the engine checks that the process group really has
WORLD_SIZE distinct ranks (accelerate on CPU can otherwise silently run every process as rank 0 of 1).
An ``accelerate launch`` config that asks for DeepSpeed or FSDP only selects the strategy (and its
stage / offload / reshard settings, resolved with every other source in trainer/engines/resolve.py);
the wrapping is always done here, never by accelerate.

Collectives time out after ``engine.timeout_s``: a dead or hung peer makes the others' next collective
fail instead of hang; :func:`describe_peer_failure` turns that error into the one line `shapeflow
train` prints before exiting with code 4.
"""
from __future__ import annotations

import abc
import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import EngineConfig, OptimConfig
from trainer.ema import EMA

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class DistributedSetupError(RuntimeError):
    """The launcher's environment and the process group disagree."""


@dataclass(frozen=True)
class Launch:
    launcher: str          # single | torchrun | accelerate
    rank: int
    local_rank: int
    world_size: int


def detect_launch(env: dict[str, str] | None = None) -> Launch:
    env = dict(os.environ if env is None else env)
    if any(key.startswith("ACCELERATE_") for key in env):
        launcher = "accelerate"
    elif "TORCHELASTIC_RUN_ID" in env or "RANK" in env:
        launcher = "torchrun"
    else:
        launcher = "single"
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local = int(env.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < world:
        raise DistributedSetupError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return Launch(launcher, rank, local, world)


def describe_peer_failure(err: BaseException, timeout_s: int) -> str | None:
    """A one-line explanation when ``err`` is a collective that failed because a peer died or hung."""
    text = f"{type(err).__name__}: {err}".lower()
    markers = ("connection closed by peer", "connection reset", "timed out", "timeout", "broken pipe",
               "distbackenderror", "distnetworkerror", "gloo", "nccl", "socket", "peer")
    if isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and any(m in text for m in markers)):
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (f"another rank died or stopped responding (collective failed or exceeded engine.timeout_s="
                f"{timeout_s}s); this rank stops too. Resume with run.resume=auto. Cause: {first[:300]}")
    return None


def _pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _backend(device: torch.device, cfg: EngineConfig) -> str:
    return cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")


def init_single_process_group(device: torch.device, cfg: EngineConfig) -> None:
    """A one-rank group without a rendezvous (sharded strategies need a group even for one process)."""
    dist.init_process_group(backend=_backend(device, cfg), store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=cfg.timeout_s))


def _init_process_group(launch: Launch, device: torch.device, cfg: EngineConfig) -> None:
    backend = _backend(device, cfg)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    dist.init_process_group(backend=backend, init_method="env://", rank=launch.rank,
                            world_size=launch.world_size, timeout=timeout)
    if dist.get_world_size() != launch.world_size:
        raise DistributedSetupError(
            f"process group has {dist.get_world_size()} processes but WORLD_SIZE={launch.world_size}")
    ranks = [None] * launch.world_size
    dist.all_gather_object(ranks, dist.get_rank())
    if sorted(ranks) != list(range(launch.world_size)):
        raise DistributedSetupError(f"ranks {ranks} are not 0..{launch.world_size - 1}: "
                                    "the launcher started processes that do not see each other")


class Engine(abc.ABC):
    """What the loop needs from a strategy: identity, prepare, one optimiser step, checkpoint state and
    collectives. Subclasses wrap the model (:mod:`trainer.engines.ddp`, ``.deepspeed``, ``.fsdp``)."""

    strategy = "base"
    needs_group = False   # sharded strategies need a process group even for one process

    def __init__(self, cfg: EngineConfig, precision: str = "fp32", optim: OptimConfig | None = None):
        self.cfg = cfg
        self.precision = precision
        self.optim_cfg = optim or OptimConfig()   # accumulation and clipping (DeepSpeed needs them up front)
        self.launch = detect_launch()
        self.device = _pick_device(self.launch.local_rank)
        self.distributed = self.launch.world_size > 1
        self._owns_group = not dist.is_initialized() and (self.distributed or self.needs_group)
        if self._owns_group:
            if self.distributed:
                _init_process_group(self.launch, self.device, cfg)
            else:
                init_single_process_group(self.device, cfg)
        self.model: nn.Module | None = None           # what forward() is called on
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def compile(self, model: nn.Module) -> nn.Module:
        """``engine.compile``: regional compilation, applied by ``prepare`` before any wrapping."""
        wanted = self.cfg.compile if self.cfg.compile is not None else self.device.type == "cuda"
        if not wanted:
            return model
        from trainer.compile import compile_model
        return compile_model(model, backend=self.cfg.compile_backend)

    # -- identity -------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- setup (per strategy) -------------------------------------------
    @abc.abstractmethod
    def prepare(self, model: nn.Module, make_optimizer: OptimizerFactory,
                make_scheduler: SchedulerFactory) -> nn.Module:
        """Move, wrap and build the optimiser; returns the module to call for the forward pass."""

    @property
    @abc.abstractmethod
    def module(self) -> nn.Module:
        """The unwrapped model (for EMA, evaluation and state dicts)."""

    @abc.abstractmethod
    def accumulate(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward + backward: gradients are reduced only when ``sync``."""

    @abc.abstractmethod
    def save_state(self, directory: Path, ema: EMA | None) -> list[str]:
        """Write model, optimiser, scheduler (and EMA) into ``directory``; returns the file names."""

    @abc.abstractmethod
    def load_state(self, directory: Path, ema: EMA | None) -> None:
        """Read what :meth:`save_state` wrote (on the same or, where supported, another world size)."""

    def named_local_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters as this rank holds them (full tensors under DDP, shards under sharded strategies)."""
        return self.module.named_parameters()

    def make_ema(self, decay: float) -> EMA:
        return EMA(self.named_local_parameters(), decay)

    def full_state_dict(self, ema: EMA | None = None) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict (EMA weights over the trained ones when given) on rank 0, on
        the CPU; None on other ranks. Collective under sharded strategies (it gathers)."""
        if not self.is_main:
            return None
        state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}  # no aliasing
        if ema is not None:
            state.update({k: v.cpu() for k, v in ema.state_dict().items()})
        return state

    def local_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The parameter and optimiser-state tensors this rank stores (for memory accounting)."""
        params = [p.to_local() if hasattr(p, "to_local") else p for p in self.module.parameters()]
        states = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return {"params": params, "optimizer": [t.to_local() if hasattr(t, "to_local") else t for t in states]}

    def memory_report(self) -> dict[str, int]:
        """Bytes of parameters and optimiser state held by this rank."""
        def nbytes(ts): return int(sum(t.numel() * t.element_size() for t in ts))
        tensors = self.local_tensors()
        return {"param_bytes": nbytes(tensors["params"]), "optimizer_bytes": nbytes(tensors["optimizer"])}

    # -- one optimiser step ---------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around forward + loss; parameters and optimiser state stay fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, clip_norm: float, skip: bool = False) -> tuple[float, bool]:
        """Clip, check and apply the gradients; returns (gradient norm, whether the step was applied).

        Gradients are already identical on every rank (all-reduced), so every rank takes the same
        decision for a non-finite norm: the update is skipped and the gradients dropped. ``skip``
        (the same on every rank, e.g. a non-finite all-reduced loss) drops the update as well.
        """
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = clip_norm if clip_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        finite = bool(torch.isfinite(torch.tensor(norm))) and not skip
        if finite:
            self.optimizer.step()
        self.scheduler.step()  # the schedule is a function of the step count, skipped or not
        self.zero_grad()
        return norm, finite

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- collectives -------------------------------------------------------
    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Mean of each value over ranks (keys must match on every rank)."""
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t)
        return t

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self, orderly: bool = True) -> None:
        """Leave the process group this engine created (see :func:`shutdown_process_group`).

        ``orderly=False`` (this rank is failing) skips the barrier: a dead peer would only make it wait."""
        if self._owns_group and dist.is_initialized():
            shutdown_process_group(min(self.cfg.timeout_s, CLOSE_BARRIER_S) if orderly else None)


CLOSE_BARRIER_S = 120


def shutdown_process_group(barrier_timeout_s: float | None = CLOSE_BARRIER_S) -> None:
    """The end of a rank's distributed life: a bounded barrier, then ``destroy_process_group()``.

    Without the barrier the rank that finishes first destroys its group and exits while its peer may
    still be in, or just leaving, the last collective (issue 18: a rank aborted at exit with "terminate
    called without an active exception"). Gloo runs collectives on worker threads, and such a thread
    releases a collective's tensors only after the caller was woken up; dropping the last reference
    to a tensor created in Python takes the GIL, and a thread that does so while the interpreter
    finalises is ended inside a noexcept destructor: std::terminate, SIGABRT. destroy_process_group()
    does not join those threads (after DDP wrapped a model the gloo backend stays referenced until
    exit), so the barrier is what puts a full round trip between every rank's last collective and
    its teardown. ``barrier_timeout_s`` bounds it (gloo: monitored_barrier, which names a missing
    rank; NCCL: the group's own timeout); a failing barrier is reported and the group destroyed anyway.
    """
    if not dist.is_initialized():
        return
    if barrier_timeout_s and dist.get_world_size() > 1:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=barrier_timeout_s))
            else:
                dist.barrier()   # NCCL: bounded by the group's timeout (its watchdog)
        except Exception as err:   # noqa: BLE001  (leaving anyway: the work of this rank is done)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            print(f"shapeflow: rank {dist.get_rank()}: barrier before leaving the process group failed "
                  f"({first[:300]}); leaving without it", file=sys.stderr, flush=True)
    dist.destroy_process_group()
