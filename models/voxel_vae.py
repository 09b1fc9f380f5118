"""Voxel VAE (TRELLIS sparse-structure VAE family): a dense 3D conv autoencoder.

    grid [B, in_channels, D, H, W] --conv_in--> ResBlocks at channels[0] --Downsample3d-->
    ... ResBlocks at channels[-1] --> middle ResBlocks --> mean/logvar [B, C, D/2^k, H/2^k, W/2^k]
    latent --conv_in--> middle ResBlocks --> ResBlocks + Upsample3d (pixel shuffle) ... --> logits
    [B, in_channels, D, H, W]

k = len(channels) - 1 levels; every grid axis must be divisible by 2^k (D, H, W may differ).
The output is raw: occupancy logits (BCE) or an SDF, as the loss decides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import require, validate_fields
from .layers import (
    ActivationCheckpointing,
    CheckpointedBlocks,
    DiagonalGaussian,
    Downsample3d,
    ResBlock3d,
    Upsample3d,
    group_norm,
    init_posterior_head,
)


@dataclass
class VoxelVAEConfig:
    in_channels: int = 1                     # 1 for occupancy or SDF grids
    latent_channels: int = 8
    channels: tuple[int, ...] = (32, 128, 512)  # per level, finest first; len-1 downsamplings
    num_res_blocks: int = 2                  # per level
    num_middle_blocks: int = 2
    resolution: int = 64                     # the grid size the presets are meant for (docs, benches)
    checkpoint_every: int = 0                # 0 off, k: checkpoint layers 0, k, 2k, ... of encoder and decoder

    def __post_init__(self):
        validate_fields(self)
        require(self, len(self.channels) >= 1, "channels must list at least one level")
        require(self, self.in_channels > 0 and self.latent_channels > 0, "in/latent channels must be > 0")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


def res_stack(channels: int, count: int) -> list[nn.Module]:
    return [ResBlock3d(channels) for _ in range(count)]


class VoxelEncoder(nn.Module):
    def __init__(self, cfg: VoxelVAEConfig):
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [nn.Conv3d(cfg.in_channels, ch[0], 3, padding=1)]
        for level, width in enumerate(ch):
            layers += res_stack(width, cfg.num_res_blocks)
            if level + 1 < len(ch):
                layers.append(Downsample3d(width, ch[level + 1]))
        layers += res_stack(ch[-1], cfg.num_middle_blocks)
        layers += [group_norm(ch[-1]), nn.SiLU(), nn.Conv3d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)]
        self.net = CheckpointedBlocks(layers, cfg.checkpoint_every)

    def forward(self, grid: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.net(grid), dim=1)


class VoxelDecoder(nn.Module):
    def __init__(self, cfg: VoxelVAEConfig):
        super().__init__()
        ch = cfg.channels[::-1]  # coarsest first
        layers: list[nn.Module] = [nn.Conv3d(cfg.latent_channels, ch[0], 3, padding=1)]
        layers += res_stack(ch[0], cfg.num_middle_blocks)
        for level, width in enumerate(ch):
            layers += res_stack(width, cfg.num_res_blocks)
            if level + 1 < len(ch):
                layers.append(Upsample3d(width, ch[level + 1]))
        layers += [group_norm(ch[-1]), nn.SiLU(), nn.Conv3d(ch[-1], cfg.in_channels, 3, padding=1)]
        self.net = CheckpointedBlocks(layers, cfg.checkpoint_every)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.net(latent)


class VoxelVAE(ActivationCheckpointing, nn.Module):
    def __init__(self, cfg: VoxelVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = VoxelEncoder(cfg)
        self.decoder = VoxelDecoder(cfg)
        init_posterior_head(self.encoder.net.blocks[-1])  # the moments conv: start near-deterministic

    def _check_grid(self, grid: torch.Tensor) -> None:
        f = self.config.downsample_factor
        if grid.ndim != 5 or grid.shape[1] != self.config.in_channels:
            raise ValueError(f"voxel VAE expects a grid [B, {self.config.in_channels}, D, H, W], "
                             f"got shape {tuple(grid.shape)}")
        if any(n % f for n in grid.shape[2:]):
            raise ValueError(f"voxel VAE: grid size {tuple(grid.shape[2:])} is not divisible by {f}")

    def encode(self, grid: torch.Tensor) -> DiagonalGaussian:
        """grid [B, in_channels, D, H, W] -> posterior over [B, latent_channels, D/f, H/f, W/f]."""
        self._check_grid(grid)
        return self.encoder(grid.to(self.encoder.net.blocks[0].weight.dtype))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, latent_channels, D', H', W'] -> logits [B, in_channels, D'f, H'f, W'f]."""
        return self.decoder(latent)

    def forward(self, grid: torch.Tensor, *, sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(grid)
        latent = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(latent), posterior



PRESETS = {
    "debug": VoxelVAEConfig(channels=(8, 16), latent_channels=4, num_res_blocks=1, num_middle_blocks=1,
                            resolution=16),
    "base": VoxelVAEConfig(channels=(32, 64, 128), latent_channels=8, resolution=64),
    # TRELLIS sparse-structure VAE scale: 64^3 occupancy -> 16^3 x 8 latent, channels 32/128/512.
    "large": VoxelVAEConfig(),
}
