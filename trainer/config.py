"""The training config: one typed dataclass tree, loaded from a YAML file of differences plus key=value overrides.

``load_train_config(path, overrides)`` returns a validated :class:`TrainConfig`; every problem raises
:class:`ConfigError` naming the key before any training work starts. The resolved config (every field)
is written to ``run.dir/config.yaml`` by the loop.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from data_pipeline.typed_config import ConfigError, load_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ModelConfig:
    name: str = "vecset_vae/debug"                          # a preset of models.presets()
    overrides: dict[str, Any] = field(default_factory=dict)  # keyword overrides for models.build
    activation_checkpointing: int = 0   # 0 off, k: checkpoint every k-th block (model.set_activation_checkpointing)
    init_from: str = ""                 # start from these weights (checkpoint, export or `shapeflow import` file):
                                        # its architecture, weights only, fresh optimizer (docs/finetune.md)


@dataclass
class DataConfig:
    path: str = ""                      # shard directory, or a list file / brace URL of shards
    batch_size: int = 4                 # per rank and per micro-step
    num_workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # task options for data_pipeline.make_loader


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    warmup_steps: int = 100             # linear warm-up from 0
    cosine: bool = True                 # cosine decay to min_lr_ratio * lr at run.max_steps (else constant)
    min_lr_ratio: float = 0.1
    grad_accum: int = 1                 # micro-steps per optimiser step
    clip_grad_norm: float = 1.0         # 0 disables clipping


@dataclass
class RunConfig:
    dir: str = "runs/default"           # checkpoints in dir/checkpoints, resolved config in dir/config.yaml
    max_steps: int = 1000
    seed: int = 0
    resume: str = "auto"                # auto | never | path to a checkpoint directory
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3                  # plus the best checkpoint (lowest logged loss)
    eval_every: int = 0                 # 0: only at the end
    nan_guard: int = 5                  # abort after this many non-finite steps in a row
    progress: bool = True               # rank 0: tqdm bar on a terminal, else a plain line every log_every


@dataclass
class EngineConfig:
    # auto: what the accelerate config asks for, else ddp (which also covers the single process);
    # the saved run.dir/config.yaml always names the strategy that ran (trainer/engines/resolve.py)
    strategy: Literal["auto", "ddp", "deepspeed", "fsdp2"] = "auto"
    zero_stage: int | None = None       # deepspeed only: 1, 2 or 3 (unset: the JSON's stage, else 2)
    offload: Literal["none", "optimizer"] = "none"           # deepspeed only: optimizer state on the CPU
    deepspeed_config: str = ""          # deepspeed only: JSON file (default configs/deepspeed/zero<stage>.json)
    reshard_after_forward: bool = True  # fsdp2 only: free gathered block weights after forward (ZeRO-3 like)
    backend: Literal["auto", "gloo", "nccl"] = "auto"        # auto: nccl on GPU, gloo on CPU
    timeout_s: int = 1800               # collective timeout: a dead rank fails the job instead of hanging
    # regional torch.compile of every block (trainer.compile_model; eager with a warning where the compiler
    # is missing). None: on for CUDA, off on CPU (minutes of C++ warm-up per run; see docs/benchmarks.md)
    compile: bool | None = None
    # torch.compile backend: inductor (generated kernels, the speed-up), or aot_eager / eager (graph capture
    # only: no C++ or Triton build; for checking that a model and a strategy compile, e.g. in CPU tests)
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"


@dataclass
class EmaConfig:
    enabled: bool = True
    decay: float = 0.999


@dataclass
class VaeSourceConfig:
    """Where the DiT gets its latents."""
    checkpoint: str = ""                # VAE checkpoint directory, or an export / `shapeflow import` .safetensors file
    latents: Literal["mode", "sample", "cached"] = "mode"    # cached: read latents stored in the shards
    scale_factor: float | None = None   # None: measured from data at the start (1 / std) and stored
    scale_batches: int = 4              # batches used to measure the scale factor
    use_ema: bool = True                # load the VAE's EMA weights


@dataclass
class ConditionConfig:
    kind: Literal["none", "class", "embedding", "image"] = "none"
    p_uncond: float = 0.1               # condition dropout for classifier-free guidance
    num_classes: int = 0                # class: number of ids
    key: str = ""                       # batch key holding the class id / embedding / image
    image_encoder: str = ""             # image: DINOv2 save_pretrained folder, or a hub id (downloaded by transformers)
    image_size: int = 518               # image: encoder input size (multiple of the patch size 14)
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)   # image: RGBA views are composited on this
    recenter: Optional[float] = None    # image: crop RGBA views to the object (alpha box), this margin per side
    cache: bool = False                 # image: encode each (sample, view) once per process (in memory)
    train_views: Optional[list[int]] = None   # image: views training draws from (None: all); the rest are held out
    eval_view: int = 0                  # image: the view evaluation and --views-from use


@dataclass
class VaeLossConfig:
    kind: Literal["sdf", "occupancy"] = "sdf"
    tau: float = 0.05                   # truncation of the SDF target
    kl_weight: float = 1e-3
    kl_warmup_steps: int = 0
    eikonal_weight: float = 0.0


@dataclass
class FlowLossConfig:
    t_mean: float = 0.0                 # logit-normal m
    t_std: float = 1.0                  # logit-normal s
    t_shift: float = 1.0                # shift alpha (also used by the sampler)
    t_bins: int = 4                     # loss logged per t bin


@dataclass
class EvalConfig:
    sample_steps: int = 30
    guidance: float = 1.0               # classifier-free guidance scale of the eval sampler (1: off)
    num_samples: int = 2
    grid_resolution: int = 48
    query_chunk: int = 32768
    fscore_threshold: float = 0.02


@dataclass
class TrainConfig:
    task: Literal["vae", "dit"] = "vae"
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16: autocast, parameters and optimiser stay fp32
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    vae: VaeSourceConfig = field(default_factory=VaeSourceConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    vae_loss: VaeLossConfig = field(default_factory=VaeLossConfig)
    flow_loss: FlowLossConfig = field(default_factory=FlowLossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Strategies the engine runs (trainer/engines/).
SUPPORTED_STRATEGIES = ("ddp", "deepspeed", "fsdp2")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def require_strategy_package(strategy: str) -> None:
    """DeepSpeed is an optional extra: say how to install it before any rank starts training
    (instead of a ModuleNotFoundError traceback from every rank)."""
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError('engine.strategy=deepspeed needs DeepSpeed, which is not installed: '
                          'pip install -e ".[deepspeed]"')


def validate_engine(engine: EngineConfig) -> EngineConfig:
    """Strategy-specific keys only with their strategy, so a typo'd strategy cannot silently run DDP."""
    deepspeed = engine.strategy in ("deepspeed", "auto")   # auto is checked again once resolved
    require_strategy_package(engine.strategy)
    _require(engine.zero_stage is None or deepspeed, "engine.zero_stage",
             f"only applies to engine.strategy=deepspeed (strategy is {engine.strategy})")
    _require(engine.zero_stage in (None, 1, 2, 3), "engine.zero_stage", f"must be 1, 2 or 3, got {engine.zero_stage}")
    _require(engine.offload == "none" or deepspeed, "engine.offload",
             f"only applies to engine.strategy=deepspeed (strategy is {engine.strategy})")
    _require(not engine.deepspeed_config or deepspeed, "engine.deepspeed_config",
             "only applies to engine.strategy=deepspeed")
    _require(not engine.deepspeed_config or Path(engine.deepspeed_config).is_file(), "engine.deepspeed_config",
             f"{engine.deepspeed_config} is not a file")
    _require(engine.timeout_s >= 1, "engine.timeout_s", "must be >= 1")
    return engine


def validate(cfg: TrainConfig) -> TrainConfig:
    """Cross-field checks; raises ConfigError naming the key."""
    _require(cfg.engine.strategy in (*SUPPORTED_STRATEGIES, "auto"), "engine.strategy",
             f"{cfg.engine.strategy!r} is not supported (supported: {', '.join(SUPPORTED_STRATEGIES)})")
    validate_engine(cfg.engine)
    _require(bool(cfg.data.path), "data.path", "is required (a shard directory or URL list)")
    _require(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    _require(cfg.run.max_steps >= 1, "run.max_steps", "must be >= 1")
    _require(cfg.run.log_every >= 1, "run.log_every", "must be >= 1")
    _require(cfg.run.ckpt_every >= 1, "run.ckpt_every", "must be >= 1")
    _require(cfg.run.keep_last >= 1, "run.keep_last", "must be >= 1")
    _require(cfg.run.nan_guard >= 1, "run.nan_guard", "must be >= 1")
    _require(cfg.run.resume in ("auto", "never") or Path(cfg.run.resume).is_dir(), "run.resume",
             f"must be auto, never or an existing checkpoint (step, run or checkpoints/) directory, "
             f"got {cfg.run.resume!r}")
    _require(cfg.model.activation_checkpointing >= 0, "model.activation_checkpointing", "must be >= 0")
    _require(not cfg.model.init_from or Path(cfg.model.init_from).exists(), "model.init_from",
             f"{cfg.model.init_from} does not exist")
    _require(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    _require(cfg.optim.grad_accum >= 1, "optim.grad_accum", "must be >= 1")
    _require(cfg.optim.clip_grad_norm >= 0, "optim.clip_grad_norm", "must be >= 0 (0 disables)")
    _require(0.0 <= cfg.ema.decay < 1.0, "ema.decay", "must be in [0, 1)")
    _require(0.0 <= cfg.condition.p_uncond <= 1.0, "condition.p_uncond", "must be in [0, 1]")
    _require(cfg.vae_loss.tau > 0, "vae_loss.tau", "must be > 0")
    _require(cfg.flow_loss.t_std > 0, "flow_loss.t_std", "must be > 0")
    _require(cfg.flow_loss.t_shift > 0, "flow_loss.t_shift", "must be > 0")
    if cfg.task == "dit":
        _require(cfg.vae.latents == "cached" or bool(cfg.vae.checkpoint), "vae.checkpoint",
                 "is required for task=dit (or set vae.latents=cached)")
        if cfg.vae.checkpoint:
            _require(Path(cfg.vae.checkpoint).is_dir() or Path(cfg.vae.checkpoint).suffix == ".safetensors"
                     and Path(cfg.vae.checkpoint).is_file(), "vae.checkpoint",
                     f"{cfg.vae.checkpoint} is neither a checkpoint directory nor a .safetensors file")
        _require(cfg.condition.kind != "class" or cfg.condition.num_classes > 0, "condition.num_classes",
                 "must be > 0 for condition.kind=class")
        _require(cfg.condition.kind != "image" or bool(cfg.condition.image_encoder), "condition.image_encoder",
                 "is required for condition.kind=image (a DINOv2 save_pretrained folder or hub id)")
        _require(cfg.condition.image_size >= 14 and cfg.condition.image_size % 14 == 0, "condition.image_size",
                 "must be a positive multiple of 14 (the DINOv2 patch size)")
        _require(all(0.0 <= c <= 1.0 for c in cfg.condition.background), "condition.background",
                 "must be three values in [0, 1]")
        _require(cfg.condition.recenter is None or 0.0 <= cfg.condition.recenter < 0.5, "condition.recenter",
                 "must be empty (off) or a margin in [0, 0.5) of the crop's side")
    return cfg


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or the name of a bundled config (``vecset_vae_debug``)."""
    path = Path(path)
    if path.exists():
        return path
    bundled = CONFIG_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    if bundled.exists():
        return bundled
    raise ConfigError(f"config file {path} does not exist (bundled configs: "
                      f"{', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))})")


def load_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    resolved = resolve_config_path(path) if path else None
    return validate(load_config(TrainConfig, resolved, overrides))
