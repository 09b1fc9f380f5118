"""Engine settings resolved once, from every source, before anything about the run is saved.

Sources, in the order they are consulted: the training config (YAML + overrides), the ``accelerate
launch`` environment (ACCELERATE_USE_DEEPSPEED / _FSDP, ACCELERATE_DEEPSPEED_*, FSDP_*,
ACCELERATE_MIXED_PRECISION), the DeepSpeed JSON (its ``zero_optimization.stage``,
``offload_optimizer.device`` and ``bf16.enabled`` when they are not "auto") and the defaults. A
setting given by two sources with different values is a :class:`ConfigError` naming both, so a saved
config rerun under another launcher either reproduces the run or fails before training.

The result is a config in which every engine field is concrete (``strategy`` is never ``auto``,
DeepSpeed runs name their stage and JSON file) plus ``resolved_from``: setting -> the source that
chose it, written beside the config (run.dir/config.yaml, the checkpoint, MLflow tags).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

from data_pipeline.typed_config import ConfigError
from trainer.config import CONFIG_DIR, EngineConfig, TrainConfig, validate_engine

Candidate = tuple[str, Any]   # (source, value); value None: this source does not say
ACCEL_DS = "accelerate config (ACCELERATE_USE_DEEPSPEED)"
ACCEL_FSDP = "accelerate config (ACCELERATE_USE_FSDP)"


def _pick(key: str, candidates: list[Candidate], default: Any, note: Callable[[str], None]) -> Any:
    """The one value the sources that say something agree on (else the default); records its source."""
    given = [(source, value) for source, value in candidates if value is not None]
    if len({json.dumps(value, default=str) for _, value in given}) > 1:
        said = ", ".join(f"{source} says {value}" for source, value in given)
        raise ConfigError(f"{key}: the sources disagree ({said}); make them agree")
    if not given:
        note(f"{key}=default")
        return default
    note(f"{key}={given[0][0]}" if len(given) == 1 else f"{key}={' + '.join(s for s, _ in given)}")
    return given[0][1]


def accelerate_strategy(env: dict[str, str]) -> str | None:
    """The strategy an ``accelerate launch`` config asks for through its environment, if any."""
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp2"
    return None


def _json_path(name: str) -> str | None:
    """An absolute DeepSpeed JSON path (the shipped accelerate configs name it from the repository root)."""
    if not name:
        return None
    path = Path(name)
    if not path.is_file() and (CONFIG_DIR.parent / name).is_file():
        path = CONFIG_DIR.parent / name
    return str(path.resolve())


def _read_json(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"engine.deepspeed_config: cannot read {path}: {err}") from None


def _json_says(ds: dict[str, Any]) -> dict[str, Any]:
    """What a DeepSpeed JSON fixes itself ("auto" fields are ours to fill and say nothing)."""
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage")
    device = str((zero.get("offload_optimizer") or {}).get("device", "none")).lower()
    bf16 = (ds.get("bf16") or {}).get("enabled")
    return {"zero_stage": stage if isinstance(stage, int) else None,
            "offload": "optimizer" if device in ("cpu", "nvme") else None,
            "precision": {True: "bf16", False: None}.get(bf16) if isinstance(bf16, bool) else None}


def _resolve_deepspeed(cfg: EngineConfig, env: dict[str, str], note) -> tuple[EngineConfig, dict[str, Any]]:
    json_sources = [("config", _json_path(cfg.deepspeed_config)),
                    ("accelerate config (ACCELERATE_DEEPSPEED_CONFIG_FILE)",
                     _json_path(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")))]
    given_json = _pick("engine.deepspeed_config", json_sources, None, lambda _: None)
    says = _json_says(_read_json(given_json)) if given_json else {}
    json_source = f"deepspeed json {given_json}"
    env_stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    stage = _pick("engine.zero_stage", [("config", cfg.zero_stage),
                                        ("accelerate config (ACCELERATE_DEEPSPEED_ZERO_STAGE)",
                                         int(env_stage) if env_stage else None),
                                        (json_source, says.get("zero_stage"))], 2, note)
    env_offload = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower()
    offload = _pick("engine.offload", [("config", "optimizer" if cfg.offload == "optimizer" else None),
                                       ("accelerate config (ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE)",
                                        "optimizer" if env_offload in ("cpu", "nvme") else None),
                                       (json_source, says.get("offload"))], "none", note)
    path = given_json or str((CONFIG_DIR / "deepspeed" / f"zero{stage}.json").resolve())
    note(f"engine.deepspeed_config={next((s for s, v in json_sources if v), 'default')}")
    resolved = dataclasses.replace(cfg, strategy="deepspeed", zero_stage=stage, offload=offload, deepspeed_config=path)
    return resolved, {json_source: says.get("precision")} if given_json else {}


def _resolve_fsdp(cfg: EngineConfig, env: dict[str, str], note) -> EngineConfig:
    raw = env.get("FSDP_RESHARD_AFTER_FORWARD")
    reshard = _pick("engine.reshard_after_forward",
                    [("config", False if not cfg.reshard_after_forward else None),
                     ("accelerate config (FSDP_RESHARD_AFTER_FORWARD)",
                      raw.lower() in ("true", "1", "full_shard") if raw is not None else None)], True, note)
    return dataclasses.replace(cfg, strategy="fsdp2", reshard_after_forward=reshard)


def resolve_engine(cfg: EngineConfig, env: dict[str, str] | None = None,
                   note: Callable[[str], None] = lambda _: None) -> tuple[EngineConfig, dict[str, Any]]:
    """``cfg`` with every engine setting concrete; also what a DeepSpeed JSON says about precision."""
    env = dict(os.environ if env is None else env)
    wanted = accelerate_strategy(env)
    source = ACCEL_DS if wanted == "deepspeed" else ACCEL_FSDP
    strategy = _pick("engine.strategy", [("config", None if cfg.strategy == "auto" else cfg.strategy),
                                         (source, wanted)], "ddp", note)
    precision_says: dict[str, Any] = {}
    if strategy == "deepspeed":
        cfg, precision_says = _resolve_deepspeed(cfg, env, note)
    elif strategy == "fsdp2":
        cfg = _resolve_fsdp(cfg, env, note)
    else:
        cfg = dataclasses.replace(cfg, strategy=strategy)
    return validate_engine(cfg), precision_says


def _accelerate_precision(env: dict[str, str]) -> str | None:
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed == "fp16":
        raise ConfigError("precision: the accelerate config asks for fp16 (ACCELERATE_MIXED_PRECISION); "
                          "shapeflow trains in fp32 or bf16")
    return mixed if mixed == "bf16" else None   # "no" is accelerate's default, not a choice


def resolve_run_config(cfg: TrainConfig, env: dict[str, str] | None = None) -> tuple[TrainConfig, dict[str, str]]:
    """The run's config with its engine settings resolved from every source, and where each came from."""
    env = dict(os.environ if env is None else env)
    notes: list[str] = []
    engine, json_precision = resolve_engine(cfg.engine, env, notes.append)
    _pick("precision", [("config", cfg.precision),
                        ("accelerate config (ACCELERATE_MIXED_PRECISION)", _accelerate_precision(env)),
                        *json_precision.items()], cfg.precision, notes.append)
    from trainer.engines.base import detect_launch
    launch = detect_launch(env)
    notes.append(f"world_size={launch.launcher} (WORLD_SIZE={launch.world_size})")
    resolved_from = dict(n.split("=", 1) for n in notes)
    return dataclasses.replace(cfg, engine=engine), resolved_from


def resolved_header(resolved_from: dict[str, str]) -> str:
    """YAML comment lines saying where each engine setting came from (config.yaml keeps its keys)."""
    if not resolved_from:
        return ""
    lines = ["# engine settings resolved from (rerunning this file under another launcher must agree):"]
    lines += [f"#   {key}: {source}" for key, source in resolved_from.items()]
    return "\n".join(lines) + "\n"
