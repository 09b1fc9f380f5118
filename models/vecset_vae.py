"""VecSet VAE (3DShape2VecSet / Dora / Hunyuan3D-2.1 / PartPacker family).

    points [B, N, 3] (+ normals, + sharp-edge points) --Fourier--> point tokens [B, N(+M), W]
    FPS query tokens [B, K, W] (a prefix of the FPS-ordered points) --cross-attn--> [B, K, W]
    --self-attn x encoder_layers--> mean/logvar [B, K, C]           (encode)
    latents [B, K, C] --linear--> [B, K, W] --self-attn x decoder_layers--> hidden   (decode)
    xyz [B, Q, 3] --Fourier--> [B, Q, W] --cross-attn to hidden--> one value per query  (query)

The value is an SDF (or TSDF, or occupancy logit): the network outputs a raw scalar
and the loss decides what it means. K is not fixed: any prefix of an FPS order is a valid
FPS subset, so training can cut the token count at random and the same weights work.

Sharp-edge points (Dora) come in three modes:
- ``concat``: one cross-attention whose context is uniform + sharp points; a learned flag
  embedding marks sharp points (Hunyuan3D-2.1's sharp-edge label channel).
- ``dual``: two cross-attentions (uniform context, sharp context) in one block, outputs summed.
- ``dual_blocks``: two complete cross-attention blocks (residual + MLP each), outputs summed
  (PartPacker's released VAE).
In all modes the query tokens are the uniform FPS prefix followed by the sharp FPS prefix.

The fields after ``checkpoint_every`` only exist to reproduce released models exactly
(trainer/interop.py imports them); their defaults are shapeflow's own layout.
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
    CrossAttentionBlock,
    DiagonalGaussian,
    FourierEmbedder,
    QKNorm,
    SelfAttentionBlock,
    SummedBlocks,
    init_linears_xavier,
    init_posterior_head,
)


@dataclass
class VecSetVAEConfig:
    width: int = 1024
    heads: int = 16
    latent_channels: int = 64
    num_latents: int = 2048          # uniform FPS query tokens used when encode() gets no count
    num_sharp_latents: int = 2048    # sharp-edge FPS query tokens (0: the model ignores sharp points)
    sharp_mode: Literal["concat", "dual", "dual_blocks"] = "concat"
    encoder_layers: int = 0          # self-attention layers after the encoder cross-attention
    decoder_layers: int = 24
    fourier_freqs: int = 8
    use_normals: bool = True
    qk_norm: QKNorm = "layernorm"
    mlp_ratio: float = 4.0
    checkpoint_every: int = 0        # 0 off, k: checkpoint blocks 0, k, 2k, ...
    fourier_include_pi: bool = True  # frequencies pi*2^k (False: 2^k)
    sharp_flag: bool = True          # learned embedding added to sharp-point tokens
    qk_norm_scope: Literal["head", "width"] = "head"
    qkv_bias: bool = True
    gelu: Literal["tanh", "exact"] = "tanh"
    norm_eps: float = 1e-5           # pre-norm LayerNorms inside the blocks
    norm_affine: bool = True

    def style(self) -> BlockStyle:
        return BlockStyle(self.qk_norm, self.qk_norm_scope, self.qkv_bias, self.mlp_ratio, self.gelu,
                          self.norm_eps, self.norm_affine)

    def __post_init__(self):
        validate_fields(self)
        require(self, self.width > 0 and self.heads > 0 and self.width % self.heads == 0,
                f"width {self.width} must be a positive multiple of heads {self.heads}")
        require(self, self.latent_channels > 0, "latent_channels must be > 0")
        require(self, self.num_latents > 0, "num_latents must be > 0")


# ---------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------

def take_queries(tokens: torch.Tensor, count: int | None, index: torch.Tensor | None) -> torch.Tensor:
    """tokens [B, N, W] -> the query tokens [B, K, W]: rows ``index`` [B, K] if given,
    else the first ``count`` rows (tokens are FPS-ordered, so a prefix is an FPS subset)."""
    if index is not None:
        return torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))
    if count > tokens.shape[1]:
        raise ValueError(f"asked for {count} FPS query tokens but only {tokens.shape[1]} points were given")
    return tokens[:, :count]


class PointEmbedder(nn.Module):
    """xyz [B, N, 3] (+ normals [B, N, 3]) -> tokens [B, N, W]; sharp points get a flag embedding."""

    def __init__(self, cfg: VecSetVAEConfig):
        super().__init__()
        self.use_normals = cfg.use_normals
        self.fourier = FourierEmbedder(cfg.fourier_freqs, cfg.fourier_include_pi)
        self.proj = nn.Linear(self.fourier.out_dim + (3 if cfg.use_normals else 0), cfg.width)
        self.sharp_flag = nn.Embedding(2, cfg.width) if cfg.sharp_flag else None

    def forward(self, xyz: torch.Tensor, normals: torch.Tensor | None, sharp: bool) -> torch.Tensor:
        features = self.fourier(xyz)
        if self.use_normals:
            if normals is None:
                raise ValueError("this VecSet VAE uses normals (use_normals=true) but none were given")
            features = torch.cat([features, normals.float()], dim=-1)
        tokens = self.proj(features.to(self.proj.weight.dtype))
        return tokens if self.sharp_flag is None else tokens + self.sharp_flag.weight[int(sharp)]


class VecSetEncoder(nn.Module):
    def __init__(self, cfg: VecSetVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = PointEmbedder(cfg)
        style = cfg.style()
        two = cfg.sharp_mode != "concat" and cfg.num_sharp_latents > 0
        if two and cfg.sharp_mode == "dual_blocks":
            cross = SummedBlocks(CrossAttentionBlock(cfg.width, cfg.heads, style) for _ in range(2))
        else:
            cross = CrossAttentionBlock(cfg.width, cfg.heads, style, num_contexts=2 if two else 1)
        self.num_contexts = 2 if two else 1
        # a one-block CheckpointedBlocks, so checkpointing also covers the point cross-attention
        self.cross = CheckpointedBlocks([cross], cfg.checkpoint_every)
        self.layers = CheckpointedBlocks(
            (SelfAttentionBlock(cfg.width, cfg.heads, style) for _ in range(cfg.encoder_layers)), cfg.checkpoint_every)
        self.norm_out = nn.LayerNorm(cfg.width)
        self.to_moments = nn.Linear(cfg.width, 2 * cfg.latent_channels)

    def forward(self, points, normals, sharp_points, sharp_normals,
                num_latents, num_sharp_latents, query_index, sharp_query_index) -> DiagonalGaussian:
        uniform = self.embed(points, normals, sharp=False)                 # [B, N, W]
        queries = take_queries(uniform, num_latents, query_index)          # [B, Ku, W]
        contexts = [uniform]
        use_sharp = self.cfg.num_sharp_latents > 0 and sharp_points is not None and sharp_points.shape[1] > 0
        if use_sharp:
            sharp = self.embed(sharp_points, sharp_normals, sharp=True)     # [B, M, W]
            queries = torch.cat([queries, take_queries(sharp, num_sharp_latents, sharp_query_index)], dim=1)
            if self.cfg.sharp_mode == "concat":
                contexts = [torch.cat([uniform, sharp], dim=1)]
            else:
                contexts.append(sharp)
        elif self.num_contexts == 2:
            # dual modes without sharp points: the sharp branch attends to the uniform points
            contexts.append(uniform)
        x = self.layers(self.cross(queries, *contexts))                   # [B, K, W]
        return DiagonalGaussian.from_moments(self.to_moments(self.norm_out(x)), dim=-1)


# ---------------------------------------------------------------------------
# Decoder and query head
# ---------------------------------------------------------------------------

class VecSetDecoder(nn.Module):
    def __init__(self, cfg: VecSetVAEConfig):
        super().__init__()
        self.proj_in = nn.Linear(cfg.latent_channels, cfg.width)
        self.layers = CheckpointedBlocks(
            (SelfAttentionBlock(cfg.width, cfg.heads, cfg.style()) for _ in range(cfg.decoder_layers)),
            cfg.checkpoint_every)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.layers(self.proj_in(latents))


class QueryHead(nn.Module):
    """xyz [B, Q, 3] attends to hidden tokens [B, K, W] -> one raw value per query [B, Q]."""

    def __init__(self, cfg: VecSetVAEConfig):
        super().__init__()
        self.fourier = FourierEmbedder(cfg.fourier_freqs, cfg.fourier_include_pi)
        self.proj = nn.Linear(self.fourier.out_dim, cfg.width)
        self.cross = CheckpointedBlocks([CrossAttentionBlock(cfg.width, cfg.heads, cfg.style())], cfg.checkpoint_every)
        self.norm_out = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, 1)

    def forward(self, hidden: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        q = self.proj(self.fourier(xyz).to(self.proj.weight.dtype))
        return self.out(self.norm_out(self.cross(q, hidden))).squeeze(-1)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

class VecSetVAE(ActivationCheckpointing, nn.Module):
    def __init__(self, cfg: VecSetVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = VecSetEncoder(cfg)
        self.decoder = VecSetDecoder(cfg)
        self.query_head = QueryHead(cfg)
        init_linears_xavier(self)
        init_posterior_head(self.encoder.to_moments)

    def encode(self, points: torch.Tensor, normals: torch.Tensor | None = None,
               sharp_points: torch.Tensor | None = None, sharp_normals: torch.Tensor | None = None, *,
               num_latents: int | None = None, num_sharp_latents: int | None = None,
               query_index: torch.Tensor | None = None,
               sharp_query_index: torch.Tensor | None = None) -> DiagonalGaussian:
        """points/normals [B, N, 3] and sharp_points/sharp_normals [B, M, 3], each FPS-ordered.
        Queries are the first ``num_latents`` uniform and ``num_sharp_latents`` sharp points
        (config defaults), or the rows given by query_index [B, Ku] / sharp_query_index [B, Ks].
        Returns the posterior over latents [B, Ku + Ks, C] (Ks = 0 without sharp points)."""
        cfg = self.config
        return self.encoder(points, normals, sharp_points, sharp_normals,
                            cfg.num_latents if num_latents is None else num_latents,
                            cfg.num_sharp_latents if num_sharp_latents is None else num_sharp_latents,
                            query_index, sharp_query_index)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, K, C] -> hidden tokens [B, K, W]; run once, then query() many chunks."""
        return self.decoder(latents)

    def query(self, hidden: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """hidden [B, K, W], xyz [B, Q, 3] -> raw values [B, Q] (SDF/TSDF or occupancy logits)."""
        return self.query_head(hidden, xyz)

    def forward(self, points, normals, xyz, sharp_points=None, sharp_normals=None, *,
                sample_posterior: bool = True, **encode_kwargs) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct: returns (values [B, Q], posterior) so the caller can add the KL term."""
        posterior = self.encode(points, normals, sharp_points, sharp_normals, **encode_kwargs)
        latents = posterior.sample() if sample_posterior else posterior.mode()
        return self.query(self.decode(latents), xyz), posterior



# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------

PRESETS = {
    "debug": VecSetVAEConfig(width=64, heads=4, latent_channels=8, num_latents=32, num_sharp_latents=32,
                             encoder_layers=1, decoder_layers=2, fourier_freqs=6),
    "base": VecSetVAEConfig(width=512, heads=8, latent_channels=64, num_latents=1024, num_sharp_latents=1024,
                            encoder_layers=2, decoder_layers=8),
    # PartPacker scale: width 1024, 16 heads, 2048 uniform + 2048 sharp tokens x 64 channels,
    # 0 encoder + 24 decoder layers (Hunyuan3D-2.1 layout: encoder_layers=8 decoder_layers=16).
    "large": VecSetVAEConfig(),
}
