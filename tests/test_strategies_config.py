"""Strategy selection without processes: config validation and accelerate's environment mapping."""
from __future__ import annotations

import pytest

from data_pipeline.typed_config import ConfigError
from trainer.config import EngineConfig, load_train_config
from trainer.engines import describe_peer_failure, resolve_engine_config, resolve_run_config
from trainer.engines.deepspeed import deepspeed_config, merge_partitions, split_partition


@pytest.mark.parametrize("overrides, key", [
    (["engine.strategy=ddp", "engine.zero_stage=3"], "engine.zero_stage"),            # deepspeed only
    (["engine.strategy=fsdp2", "engine.offload=optimizer"], "engine.offload"),
    (["engine.strategy=deepspeed", "engine.zero_stage=4"], "engine.zero_stage"),
    (["engine.strategy=deepspeed", "engine.offload=nvme"], "engine.offload"),
    (["engine.strategy=deepspeed", "engine.deepspeed_config=/no/such.json"], "engine.deepspeed_config"),
    (["engine.strategy=zero"], "engine.strategy"),
])
def test_engine_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_train_config("vecset_vae_debug", ["data.path=x", *overrides])


def test_accelerate_environment_selects_the_strategy():
    ds = resolve_engine_config(EngineConfig(), {
        "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": "configs/deepspeed/zero3.json"})
    assert (ds.strategy, ds.zero_stage, ds.offload) == ("deepspeed", 3, "optimizer")
    assert ds.deepspeed_config.endswith("configs/deepspeed/zero3.json")
    with pytest.raises(ConfigError, match="engine.zero_stage: the sources disagree .*config says 1.*says 3"):
        resolve_engine_config(EngineConfig(strategy="deepspeed", zero_stage=1),
                              {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    fsdp = resolve_engine_config(EngineConfig(), {"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false"})
    assert (fsdp.strategy, fsdp.reshard_after_forward) == ("fsdp2", False)
    assert resolve_engine_config(EngineConfig(), {"ACCELERATE_USE_CPU": "true"}).strategy == "ddp"
    with pytest.raises(ConfigError, match="make them agree"):
        resolve_engine_config(EngineConfig(strategy="fsdp2"), {"ACCELERATE_USE_DEEPSPEED": "true"})


ZERO2_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "configs/deepspeed/zero2.json",
             "WORLD_SIZE": "2", "RANK": "0"}


def test_resolved_config_reproduces_itself_or_names_the_disagreeing_source():
    cfg = load_train_config("vecset_vae_debug", ["data.path=x"])
    resolved, sources = resolve_run_config(cfg, ZERO2_ENV)
    assert (resolved.engine.strategy, resolved.engine.zero_stage) == ("deepspeed", 2)
    assert sources["engine.strategy"].startswith("accelerate config")
    assert sources["engine.zero_stage"].startswith("deepspeed json") and sources["world_size"].endswith("=2)")
    again, _ = resolve_run_config(resolved, {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "0"})
    assert again == resolved                      # the saved config under torchrun: the same settings
    with pytest.raises(ConfigError, match="engine.strategy.*config says deepspeed.*ACCELERATE_USE_FSDP"):
        resolve_run_config(resolved, {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(ConfigError, match="engine.strategy.*config says ddp"):   # a saved DDP run
        resolve_run_config(resolve_run_config(cfg, {})[0], ZERO2_ENV)
    with pytest.raises(ConfigError, match="precision.*ACCELERATE_MIXED_PRECISION"):
        resolve_run_config(resolved, {**ZERO2_ENV, "ACCELERATE_MIXED_PRECISION": "bf16"})
    with pytest.raises(ConfigError, match="engine.zero_stage"):   # stage-less strategies refuse a stage
        resolve_run_config(load_train_config("vecset_vae_debug", ["data.path=x", "engine.zero_stage=3"]), {})


def test_deepspeed_json_gets_the_run_values():
    base = {"train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8, "offload_optimizer": {"device": "cpu"}}}
    cfg = deepspeed_config(base, stage=3, offload="none", precision="bf16", grad_accum=4, clip_norm=0.5,
                           world_size=8, num_params=10_000)
    assert cfg["train_batch_size"] == 32 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] is True
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and "offload_optimizer" not in zero
    assert zero["reduce_bucket_size"] == 12288   # capped at the model size, 4096-aligned
    off = deepspeed_config(base, stage=2, offload="optimizer", precision="fp32", grad_accum=1, clip_norm=0,
                           world_size=2, num_params=10)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and off["bf16"]["enabled"] is False


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_zero3_partitions_merge_and_resplit(world):
    import torch
    full = torch.arange(14, dtype=torch.float32).view(2, 7)
    parts = [split_partition(full, r, world) for r in range(world)]
    assert len({p.numel() for p in parts}) == 1          # equal partitions, the last one padded
    assert torch.equal(merge_partitions(parts, full.shape), full)


def test_peer_failures_are_recognised():
    msg = describe_peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer"), 30)
    assert msg and "engine.timeout_s=30" in msg
    assert describe_peer_failure(ValueError("bad value"), 30) is None
