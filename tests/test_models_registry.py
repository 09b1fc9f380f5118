"""models.build / presets / config_for: names, overrides, errors, and parameter counts of the
anchor-scale presets (counted on the meta device, nothing allocated)."""
import dataclasses
import time

import pytest
import torch

import models


def test_presets_cover_every_family_and_size():
    names = models.presets()
    for family in ("vecset_vae", "voxel_vae", "vecset_dit", "voxel_dit"):
        for size in ("debug", "base", "large"):
            assert f"{family}/{size}" in names


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="vecset_dit/debug") as err:
        models.build("vecset_dit/huge")
    assert "unknown model 'vecset_dit/huge'" in str(err.value)
    with pytest.raises(ValueError, match="valid names"):
        models.build("dit")


def test_overrides_apply_and_bad_keys_or_values_are_named():
    model = models.build("vecset_dit/debug", depth=3)
    assert len(model.trunk.blocks) == 3 and model.config.depth == 3
    assert models.build("vecset_dit/debug").config.depth == 2  # the preset itself is untouched
    with pytest.raises(ValueError, match="'dept'"):
        models.build("vecset_dit/debug", dept=3)
    with pytest.raises(ValueError, match="qk_norm"):
        models.build("vecset_vae/debug", qk_norm="batchnorm")
    with pytest.raises(ValueError, match="heads"):
        models.build("vecset_dit/debug", heads=5)
    with pytest.raises(ValueError, match="DiTConfig.depth"):
        models.build("vecset_dit/debug", depth="3")


def test_config_for_and_build_from_config():
    cfg = models.config_for("voxel_vae/debug", latent_channels=2)
    assert isinstance(cfg, models.VoxelVAEConfig) and cfg.latent_channels == 2
    model = models.build_from_config(cfg)
    assert isinstance(model, models.VoxelVAE) and model.config is cfg
    assert isinstance(models.build_from_config(models.VoxelDiTConfig(width=48, depth=1, heads=2,
                                                                     condition_dim=8)), models.VoxelDiT)
    with pytest.raises(ValueError, match="not a model config"):
        models.build_from_config({"width": 3})
    # typed_config can fill the same dataclasses from YAML data (the trainer's route)
    from data_pipeline.typed_config import from_dict
    loaded = from_dict(models.DiTConfig, {"width": 64, "heads": 4, "depth": 1})
    assert dataclasses.asdict(loaded)["width"] == 64


def test_debug_presets_run_a_step_fast():
    inputs = {
        "vecset_vae/debug": lambda m: (torch.rand(2, 256, 3), torch.randn(2, 256, 3), torch.rand(2, 512, 3),
                                       torch.rand(2, 64, 3), torch.randn(2, 64, 3)),
        "voxel_vae/debug": lambda m: ((torch.rand(2, 1, 16, 16, 16) > 0.5).float(),),
        "vecset_dit/debug": lambda m: (torch.randn(2, 64, 8), torch.rand(2), torch.randn(2, 4, 32)),
        "voxel_dit/debug": lambda m: (torch.randn(2, 4, 8, 8, 8), torch.rand(2), torch.randn(2, 4, 32)),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is immune to other jobs busy on the same cores
    try:
        for name, make in inputs.items():
            assert_step_under_a_second(name, make)
    finally:
        torch.set_num_threads(threads)


def assert_step_under_a_second(name, make):
    torch.manual_seed(0)
    model = models.build(name)
    args = make(model)
    model(*args)  # warm-up
    seconds = []
    for _ in range(5):  # best of 5: other jobs share these cores
        start = time.perf_counter()
        out = model(*args)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 1.0, (name, seconds)


# Parameter counts (millions) stated in docs/models.md; counted without allocating memory.
EXPECTED_MILLIONS = {
    "vecset_vae/large": 327.8, "vecset_vae/base": 38.0,
    "voxel_vae/large": 133.0, "voxel_vae/base": 10.6,
    "vecset_dit/large": 1216.4, "vecset_dit/base": 162.7,
    "voxel_dit/large": 1216.2, "voxel_dit/base": 162.7,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_MILLIONS))
def test_large_presets_parameter_counts_on_meta_device(name):
    with torch.device("meta"):
        model = models.build(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(EXPECTED_MILLIONS[name], abs=0.1)


def test_anchor_scale_presets_match_design():
    vae = models.config_for("vecset_vae/large")
    assert (vae.width, vae.heads, vae.latent_channels) == (1024, 16, 64)
    assert vae.num_latents + vae.num_sharp_latents == 4096
    assert (vae.encoder_layers, vae.decoder_layers) == (0, 24)
    dit = models.config_for("vecset_dit/large")
    assert (dit.width, dit.depth, dit.heads, dit.qk_norm) == (1536, 24, 16, "rmsnorm")
