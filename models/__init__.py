"""shapeflow networks: VecSet VAE, voxel VAE, VecSet DiT, voxel DiT (no losses, no optimisers,
no distributed code; the trainer owns those).

Public API (what configs, tools and users call)::

    import models
    models.presets()                          # ['vecset_dit/base', 'vecset_dit/debug', ...]
    model = models.build("vecset_dit/debug", depth=3)   # preset + field overrides -> nn.Module
    cfg = models.config_for("vecset_vae/large", decoder_layers=16)  # the typed dataclass config
    model = models.build_from_config(cfg)     # e.g. a config section loaded by the trainer
    model.set_activation_checkpointing(k)     # 0 off, k: every k-th block (all four families)

Names are ``<family>/<preset>`` with families vecset_vae, voxel_vae, vecset_dit, voxel_dit and
presets debug, base, large (the anchors' scale). An unknown name raises ValueError listing the
valid ones; an unknown or ill-typed override raises ValueError naming the key. Config classes
(VecSetVAEConfig, VoxelVAEConfig, DiTConfig, VoxelDiTConfig) are plain dataclasses, so the
trainer can also fill them with data_pipeline.typed_config.from_dict. See docs/models.md.
"""
from __future__ import annotations

import copy
import dataclasses

from torch import nn

from . import dit, vecset_vae, voxel_vae
from .dit import DiTConfig, VecSetDiT, VoxelDiT, VoxelDiTConfig
from .layers import DiagonalGaussian
from .vecset_vae import VecSetVAE, VecSetVAEConfig
from .voxel_vae import VoxelVAE, VoxelVAEConfig

# family -> (model class, config class, presets)
FAMILIES: dict[str, tuple[type[nn.Module], type, dict]] = {
    "vecset_vae": (VecSetVAE, VecSetVAEConfig, vecset_vae.PRESETS),
    "voxel_vae": (VoxelVAE, VoxelVAEConfig, voxel_vae.PRESETS),
    "vecset_dit": (VecSetDiT, DiTConfig, dit.VECSET_PRESETS),
    "voxel_dit": (VoxelDiT, VoxelDiTConfig, dit.VOXEL_PRESETS),
}

__all__ = ["build", "build_from_config", "config_for", "presets", "FAMILIES", "DiagonalGaussian",
           "VecSetVAE", "VecSetVAEConfig", "VoxelVAE", "VoxelVAEConfig", "VecSetDiT", "VoxelDiT",
           "DiTConfig", "VoxelDiTConfig"]


def presets() -> list[str]:
    """All valid model names, sorted."""
    return sorted(f"{family}/{preset}" for family, (_, _, table) in FAMILIES.items() for preset in table)


def family_of(name: str) -> str:
    family, _, preset = name.partition("/")
    if family not in FAMILIES or preset not in FAMILIES[family][2]:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(presets())}")
    return family


def config_for(name: str, **overrides):
    """The preset's config (a fresh copy) with ``overrides`` applied and validated."""
    family = family_of(name)
    _, config_cls, table = FAMILIES[family]
    base = copy.deepcopy(table[name.partition("/")[2]])
    valid = {f.name for f in dataclasses.fields(config_cls)}
    for key in overrides:
        if key not in valid:
            raise ValueError(f"unknown override {key!r} for {name}; valid keys: {', '.join(sorted(valid))}")
    return dataclasses.replace(base, **overrides)  # re-runs __post_init__ validation


def build_from_config(cfg) -> nn.Module:
    """Instantiate the model that ``cfg`` (one of the four config classes) describes."""
    for model_cls, config_cls, _ in FAMILIES.values():
        if type(cfg) is config_cls:
            return model_cls(cfg)
    raise ValueError(f"not a model config: {type(cfg).__name__} "
                     f"(expected one of {', '.join(c.__name__ for _, c, _ in FAMILIES.values())})")


def build(name: str, **overrides) -> nn.Module:
    """``build("vecset_dit/debug", depth=3)``: the preset's model with field overrides.
    Wrap in ``with torch.device("meta"):`` to count parameters without allocating them."""
    return build_from_config(config_for(name, **overrides))
