"""Rectified-flow DiTs: one transformer trunk, two ways to turn latents into tokens.

    VecSet DiT: latents [B, N, C] --linear--> tokens [B, N, W]  (a set: no patchify, no
                positional embedding, any N at run time)
    Voxel DiT:  latent grid [B, C, D, H, W] --3D patchify + linear + 3D sin-cos--> tokens
                [B, (D/p)(H/p)(W/p), W]
    trunk:      t [B] in [0, 1] --sinusoid(1000 t) + MLP--> c [B, W]
                (class mode: c += class embedding [B, W], the adaLN input, as in DiT)
                depth x DiTBlock(tokens, c, condition tokens)   (adaLN self-attn, cross-attn, adaLN MLP)
                final adaLN + linear --> velocity with the input's shape

The adaLN modulations and the output projection start at zero, so a fresh model predicts
exactly 0. Conditions (config ``condition``):
- ``tokens``: condition tokens [B, L, condition_dim] (e.g. DINOv2 features), layer-normalised
  (no affine: QK-norm normalises keys, not values; PartPacker does the same), via cross-attention;
- ``class``:  class ids [B] -> an embedding table [B, W] added to the timestep embedding (the
  adaLN input, as DiT; one cross-attention key would always get weight 1: a constant);
- ``none``:   unconditional, no cross-attention.
``null_condition(batch)`` gives the condition that classifier-free guidance uses for the
unconditional branch (learned or zero token; the extra "null" class id), and
``drop_condition(cond, mask)`` swaps it in for the rows selected by ``mask``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .config import require, validate_fields
from .layers import (
    ActivationCheckpointing,
    BlockStyle,
    CheckpointedBlocks,
    DiTBlock,
    DiTFinalLayer,
    QKNorm,
    TimestepEmbedder,
    init_linears_xavier,
    patchify_3d,
    sincos_pos_embed_3d,
    unpatchify_3d,
)


@dataclass
class DiTConfig:
    in_channels: int = 64            # latent channels (the VAE's latent_channels)
    width: int = 1536
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    qk_norm: QKNorm = "rmsnorm"
    condition: Literal["tokens", "class", "none"] = "tokens"
    condition_dim: int = 1024        # tokens mode: channels of the condition tokens (DINOv2-L: 1024)
    num_classes: int = 0             # class mode: ids 0..num_classes-1, id num_classes is the null class
    null_condition: Literal["learned", "zero"] = "learned"  # tokens mode
    time_scale: float = 1000.0       # t in [0, 1] is multiplied by this before the sinusoid
    checkpoint_every: int = 0        # 0 off, k: checkpoint blocks 0, k, 2k, ...
    # Only to reproduce released models exactly (trainer/interop.py); defaults are shapeflow's layout.
    qk_norm_scope: Literal["head", "width"] = "head"
    gelu: Literal["tanh", "exact"] = "tanh"
    norm_affine: bool = True         # the cross-attention's pre-norm
    final_adaln: bool = True         # False: plain LayerNorm + linear output layer (PartPacker)
    part_embed: bool = False         # a learned vector added to the second half of the tokens (PartPacker parts)
    context_norm: bool = True        # tokens mode: non-affine LayerNorm on the condition tokens (False: as
                                     # given; PartPacker's released DiT gets tokens its pipeline normalised)

    def style(self) -> BlockStyle:
        return BlockStyle(self.qk_norm, self.qk_norm_scope, True, self.mlp_ratio, self.gelu, 1e-6, self.norm_affine)

    def __post_init__(self):
        validate_fields(self)
        require(self, self.width > 0 and self.heads > 0 and self.width % self.heads == 0,
                f"width {self.width} must be a positive multiple of heads {self.heads}")
        require(self, self.in_channels > 0, "in_channels must be > 0")
        require(self, self.condition != "tokens" or self.condition_dim > 0,
                "condition=tokens needs condition_dim > 0")
        require(self, self.condition != "class" or self.num_classes > 0, "condition=class needs num_classes > 0")


@dataclass
class VoxelDiTConfig(DiTConfig):
    in_channels: int = 8             # the voxel VAE's latent_channels
    resolution: int = 16             # latent grid side the positional embedding is built for
    patch_size: int = 1

    def __post_init__(self):
        super().__post_init__()
        require(self, not self.part_embed, "part_embed applies to the VecSet DiT only")
        require(self, self.patch_size > 0 and self.resolution % self.patch_size == 0,
                f"resolution {self.resolution} must be divisible by patch_size {self.patch_size}")


# ---------------------------------------------------------------------------
# Shared trunk
# ---------------------------------------------------------------------------

class DiTTrunk(nn.Module):
    """Timestep + condition embedding, the DiT blocks and the final layer over tokens [B, N, W]."""

    def __init__(self, cfg: DiTConfig, out_dim: int):
        super().__init__()
        self.config = cfg
        self.t_embedder = TimestepEmbedder(cfg.width, time_scale=cfg.time_scale)
        context_dim = None
        if cfg.condition == "tokens":
            context_dim = cfg.condition_dim
            self.context_norm = (nn.LayerNorm(cfg.condition_dim, elementwise_affine=False, eps=1e-6)
                                 if cfg.context_norm else nn.Identity())
            if cfg.null_condition == "learned":
                self.null_token = nn.Parameter(torch.randn(cfg.condition_dim) * 0.02)
            else:
                self.register_buffer("null_token", torch.zeros(cfg.condition_dim), persistent=False)
        elif cfg.condition == "class":
            self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.width)  # last row: null class
        self.blocks = CheckpointedBlocks(
            (DiTBlock(cfg.width, cfg.heads, context_dim, cfg.style()) for _ in range(cfg.depth)), cfg.checkpoint_every)
        self.final = DiTFinalLayer(cfg.width, out_dim, cfg.final_adaln)

    def zero_init(self) -> None:
        """Zero adaLN modulations and the output projection (after the generic init)."""
        for block in self.blocks.blocks:
            nn.init.zeros_(block.adaLN[1].weight)
            nn.init.zeros_(block.adaLN[1].bias)
        for layer in self.final.zero_init_layers():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

    def null_condition(self, batch_size: int, num_tokens: int = 1) -> torch.Tensor | None:
        """The CFG null condition for ``batch_size`` samples: tokens [B, num_tokens, condition_dim]
        (tokens mode), the null class id [B] (class mode), or None (unconditional)."""
        cfg = self.config
        if cfg.condition == "tokens":
            return self.null_token.expand(batch_size, num_tokens, -1)
        if cfg.condition == "class":
            return torch.full((batch_size,), cfg.num_classes, dtype=torch.long, device=self.class_embed.weight.device)
        return None

    def drop_condition(self, cond: torch.Tensor | None, drop: torch.Tensor) -> torch.Tensor | None:
        """Replace the condition of samples where ``drop`` [B] (bool) is true by the null condition."""
        if self.config.condition == "none":
            return None
        null = self.null_condition(cond.shape[0], cond.shape[1] if cond.ndim == 3 else 1).to(cond.dtype)
        mask = drop.reshape(-1, *([1] * (cond.ndim - 1)))
        return torch.where(mask, null, cond)

    def _condition(self, cond: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """The checked condition: None (unconditional), class ids [B] or condition tokens [B, L, D]."""
        cfg = self.config
        if cfg.condition == "none":
            if cond is not None:
                raise ValueError("this DiT is unconditional (condition=none) but a condition was given")
            return None
        if cond is None:
            cond = self.null_condition(batch_size)
        if cfg.condition == "class":
            if cond.shape != (batch_size,) or cond.dtype != torch.long:
                raise ValueError(f"class-conditioned DiT expects class ids [B] (int64), got {tuple(cond.shape)} {cond.dtype}")
        elif cond.ndim != 3 or cond.shape[0] != batch_size or cond.shape[2] != cfg.condition_dim:
            raise ValueError(f"DiT expects condition tokens [{batch_size}, L, {cfg.condition_dim}], "
                             f"got {tuple(cond.shape)}")
        return cond

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        batch = tokens.shape[0]
        c = self.t_embedder(torch.as_tensor(t, device=tokens.device), batch)  # [B, W]
        cond = self._condition(cond, batch)
        context = None
        if self.config.condition == "class":
            c = c + self.class_embed(cond)                                    # [B, W]: the adaLN input
        elif cond is not None:
            context = self.context_norm(cond.float()).to(tokens.dtype)        # [B, L, condition_dim]
        c = c.to(tokens.dtype)
        return self.final(self.blocks(tokens, c, context), c)


class _DiTBase(ActivationCheckpointing, nn.Module):
    """What both DiTs expose to the trainer besides forward()."""

    trunk: DiTTrunk

    def null_condition(self, batch_size: int, num_tokens: int = 1):
        return self.trunk.null_condition(batch_size, num_tokens)

    def drop_condition(self, cond, drop: torch.Tensor):
        return self.trunk.drop_condition(cond, drop)


    def _init_weights(self) -> None:
        init_linears_xavier(self)
        self.trunk.zero_init()


# ---------------------------------------------------------------------------
# VecSet DiT
# ---------------------------------------------------------------------------

class VecSetDiT(_DiTBase):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.proj_in = nn.Linear(cfg.in_channels, cfg.width)
        # PartPacker marks the second part's tokens [N/2:] with one learned vector [W]
        self.part_embed = nn.Parameter(torch.randn(cfg.width) / cfg.width**0.5) if cfg.part_embed else None
        self.trunk = DiTTrunk(cfg, out_dim=cfg.in_channels)
        self._init_weights()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, C] noisy latents, t [B] (or scalar) in [0, 1], cond as in the module doc ->
        velocity [B, N, C]. cond=None uses the null condition."""
        if x.ndim != 3 or x.shape[-1] != self.config.in_channels:
            raise ValueError(f"VecSet DiT expects latents [B, N, {self.config.in_channels}], got {tuple(x.shape)}")
        tokens = self.proj_in(x)
        if self.part_embed is not None:
            half = tokens.shape[1] // 2
            tokens = torch.cat([tokens[:, :half], tokens[:, half:] + self.part_embed], dim=1)
        return self.trunk(tokens, t, cond)


# ---------------------------------------------------------------------------
# Voxel DiT
# ---------------------------------------------------------------------------

class VoxelDiT(_DiTBase):
    def __init__(self, cfg: VoxelDiTConfig):
        super().__init__()
        self.config = cfg
        p = cfg.patch_size
        self.proj_in = nn.Linear(cfg.in_channels * p**3, cfg.width)
        self.default_grid = (cfg.resolution // p,) * 3
        self.register_buffer("pos_embed", sincos_pos_embed_3d(cfg.width, self.default_grid), persistent=False)
        self.trunk = DiTTrunk(cfg, out_dim=cfg.in_channels * p**3)
        self._init_weights()

    def _pos_embed(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """[tokens, W]; other grid shapes than the configured one are computed on the fly."""
        if grid == self.default_grid:
            return self.pos_embed
        return sincos_pos_embed_3d(self.config.width, grid, device=self.pos_embed.device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, D, H, W] noisy latent grid (each axis divisible by patch_size), t [B] in [0, 1]
        -> velocity [B, C, D, H, W]."""
        cfg, p = self.config, self.config.patch_size
        if x.ndim != 5 or x.shape[1] != cfg.in_channels or any(n % p for n in x.shape[2:]):
            raise ValueError(f"voxel DiT expects a latent grid [B, {cfg.in_channels}, D, H, W] with sides "
                             f"divisible by patch_size {p}, got {tuple(x.shape)}")
        grid = tuple(n // p for n in x.shape[2:])
        tokens = self.proj_in(patchify_3d(x, p)) + self._pos_embed(grid).to(x.dtype)
        return unpatchify_3d(self.trunk(tokens, t, cond), p, grid)


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------

VECSET_PRESETS = {
    "debug": DiTConfig(in_channels=8, width=64, depth=2, heads=4, condition_dim=32),
    "base": DiTConfig(in_channels=64, width=768, depth=12, heads=12),
    # PartPacker scale: width 1536 x 24 layers x 16 heads, DINOv2-L tokens (1024) -> ~1.2B parameters
    "large": DiTConfig(),
}

VOXEL_PRESETS = {
    "debug": VoxelDiTConfig(in_channels=4, width=64, depth=2, heads=4, condition_dim=32, resolution=8,
                            patch_size=2),
    "base": VoxelDiTConfig(width=768, depth=12, heads=12, resolution=16, patch_size=2),
    # TRELLIS sparse-structure flow layout (16^3 x 8 latent, patch 1) at the anchors' DiT width
    "large": VoxelDiTConfig(),
}
