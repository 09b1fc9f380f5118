"""Building blocks shared by the four model families.

Reads top to bottom: tensor reshapes (3D pixel shuffle, patchify), positional and
timestep features, the diagonal Gaussian posterior, attention and MLP, transformer
blocks (plain and adaLN-modulated), 3D conv blocks, and the activation-checkpointing
helper. Nothing here knows about losses, optimisers or distributed training.

Shape letters: B batch, N/L token counts, C channels, D/H/W grid sizes, r factor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

QKNorm = Literal["none", "layernorm", "rmsnorm"]


@dataclass(frozen=True)
class BlockStyle:
    """How the transformer blocks are built. The defaults are shapeflow's own layout; the other
    values exist to reproduce released models exactly (trainer/interop.py, docs/finetune.md).

    qk_norm_scope: "head" normalises each head's q/k over head_dim (affine); "width" normalises
        q/k over all heads at once before the head split (PartPacker; LayerNorm then follows
        ``norm_affine``, RMSNorm always has a weight).
    qkv_bias: bias on the q/k/v projections (the output projection always has one).
    gelu: "tanh" (approximate) or "exact" (erf) GELU in the MLPs.
    norm_eps, norm_affine: the pre-norm LayerNorms inside the blocks (not the VAE's output norms).
    """
    qk_norm: QKNorm = "layernorm"
    qk_norm_scope: Literal["head", "width"] = "head"
    qkv_bias: bool = True
    mlp_ratio: float = 4.0
    gelu: Literal["tanh", "exact"] = "tanh"
    norm_eps: float = 1e-5
    norm_affine: bool = True

    def norm(self, width: int) -> nn.LayerNorm:
        return nn.LayerNorm(width, eps=self.norm_eps, elementwise_affine=self.norm_affine)


# ---------------------------------------------------------------------------
# 3D reshapes
# ---------------------------------------------------------------------------

def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, C*r^3, D, H, W] -> [B, C, D*r, H*r, W*r].

    Channel index c*r^3 + i*r^2 + j*r + k goes to voxel (d*r+i, h*r+j, w*r+k), the 3D
    analogue of torch.nn.functional.pixel_shuffle. Every axis keeps its own size, so
    this is correct for non-cubic grids (the article's version is not, see docs/design.md).
    """
    b, c, d, h, w = x.shape
    r = factor
    if c % r**3:
        raise ValueError(f"pixel_shuffle_3d: {c} channels are not divisible by factor^3 = {r**3}")
    x = x.reshape(b, c // r**3, r, r, r, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # b, c, d, i, h, j, w, k
    return x.reshape(b, c // r**3, d * r, h * r, w * r)


def pixel_unshuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, C, D*r, H*r, W*r] -> [B, C*r^3, D, H, W]; the exact inverse of pixel_shuffle_3d."""
    b, c, dr, hr, wr = x.shape
    r = factor
    if dr % r or hr % r or wr % r:
        raise ValueError(f"pixel_unshuffle_3d: grid {(dr, hr, wr)} is not divisible by factor {r}")
    x = x.reshape(b, c, dr // r, r, hr // r, r, wr // r, r)  # b, c, d, i, h, j, w, k
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * r**3, dr // r, hr // r, wr // r)


def patchify_3d(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, D, H, W] -> tokens [B, (D/p)(H/p)(W/p), C*p^3], tokens in C order over (d, h, w)."""
    return pixel_unshuffle_3d(x, patch).flatten(2).transpose(1, 2)


def unpatchify_3d(tokens: torch.Tensor, patch: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """tokens [B, D'*H'*W', C*p^3] with grid = (D', H', W') -> [B, C, D'p, H'p, W'p]."""
    b, n, cp = tokens.shape
    if n != math.prod(grid):
        raise ValueError(f"unpatchify_3d: {n} tokens do not fill grid {tuple(grid)}")
    x = tokens.transpose(1, 2).reshape(b, cp, *grid)
    return pixel_shuffle_3d(x, patch)


# ---------------------------------------------------------------------------
# Positional and timestep features
# ---------------------------------------------------------------------------

class FourierEmbedder(nn.Module):
    """xyz [..., 3] -> [..., 3 + 6*num_freqs]: the input plus sin/cos at frequencies pi*2^k
    (2^k with include_pi=False, as Hunyuan3D-2.1 and PartPacker's releases), laid out as
    [x, y, z, sin(x f0..fF-1), sin(y ...), sin(z ...), cos(...)]."""

    def __init__(self, num_freqs: int = 8, include_pi: bool = True):
        super().__init__()
        freqs = (math.pi if include_pi else 1.0) * 2.0 ** torch.arange(num_freqs, dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)
        self.out_dim = 3 + 6 * num_freqs

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        # fp32 so that high frequencies keep their phase under bf16 inputs
        x = xyz.float()
        angles = (x[..., None] * self.freqs).flatten(-2)  # [..., 3*F]
        return torch.cat([x, angles.sin(), angles.cos()], dim=-1)


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """values [B] -> [B, dim] of cos/sin at geometrically spaced frequencies (fp32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] ([B] or scalar) -> [B, width]; t is scaled by ``time_scale`` (1000 by
    default) before the sinusoid so that its frequencies match the usual DiT range. t is
    continuous, so there is no integer index that could overflow (PartPacker's pitfall)."""

    def __init__(self, width: int, freq_dim: int = 256, time_scale: float = 1000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_scale = time_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor, batch_size: int) -> torch.Tensor:
        t = t.reshape(-1).expand(batch_size) if t.numel() == 1 else t.reshape(-1)
        emb = sinusoidal_embedding(t * self.time_scale, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def sincos_pos_embed_3d(width: int, grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """Fixed 3D sin-cos embedding [D*H*W, width] for tokens in C order over (d, h, w).

    Each axis gets (width // 6) * 2 channels of 1D sin-cos features; leftover channels are 0.
    """
    per_axis = (width // 6) * 2
    if per_axis == 0:
        raise ValueError(f"sincos_pos_embed_3d: width {width} is too small (needs >= 6)")
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    parts = [sinusoidal_embedding(coords[:, i], per_axis) for i in range(3)]
    return F.pad(torch.cat(parts, dim=-1), (0, width - 3 * per_axis))


# ---------------------------------------------------------------------------
# Posterior
# ---------------------------------------------------------------------------

class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over latents of any shape [B, ...]."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite in bf16/fp32

    @classmethod
    def from_moments(cls, moments: torch.Tensor, dim: int) -> "DiagonalGaussian":
        mean, logvar = moments.chunk(2, dim=dim)
        return cls(mean, logvar)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample [B], averaged over latent elements (fp32)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        per_element = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
        return per_element.flatten(1).mean(dim=1)


POSTERIOR_INIT_LOGVAR = -6.0  # initial posterior std exp(-3) ~ 0.05


def init_posterior_head(layer: nn.Module, logvar: float = POSTERIOR_INIT_LOGVAR) -> None:
    """Start a moments layer (Linear/Conv, out features [2C] = mean then logvar) with a narrow posterior.

    Generic initialisations give logvar ~ N(0, ~1.5), i.e. posterior noise larger than the mean
    (signal-to-noise < 1) from the first step: the decoder then learns to average the noise away and
    ignores the latent, the (weak, per-element) KL cannot pull the std back, and decoding mode()
    fails while samples look fine. Zero weights and a negative bias on the logvar half make the
    VAE start as a near-deterministic autoencoder; the KL term widens the posterior as it trains.
    """
    channels = layer.weight.shape[0] // 2
    with torch.no_grad():
        layer.weight[channels:].zero_()
        layer.bias[channels:].fill_(logvar)


# ---------------------------------------------------------------------------
# Attention and MLP
# ---------------------------------------------------------------------------

def make_qk_norm(kind: QKNorm, dim: int, affine: bool = True) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown qk_norm {kind!r} (valid: none, layernorm, rmsnorm)")


class FusedLinear(nn.Linear):
    """An nn.Linear whose output rows are several projections stacked ([sum(splits), in]).

    One GEMM instead of several; ``init_linears_xavier`` initialises each row block of ``splits``
    as the separate layer it replaces would be, so a fused model starts from the same weights."""

    def __init__(self, in_features: int, splits: tuple[int, ...], bias: bool = True):
        super().__init__(in_features, sum(splits), bias=bias)
        self.splits = tuple(splits)


def _merge_split_projections(state_dict: dict, prefix: str, parts: tuple[str, ...], fused: str) -> None:
    """Old checkpoints: concatenate ``prefix + part + .weight/.bias`` (rows) into ``prefix + fused``."""
    for suffix in ("weight", "bias"):
        keys = [f"{prefix}{part}.{suffix}" for part in parts]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{fused}.{suffix}"] = torch.cat([state_dict.pop(k) for k in keys], dim=0)


class Attention(nn.Module):
    """Multi-head attention via F.scaled_dot_product_attention.

    Self-attention when ``context`` is None, cross-attention to context [B, L, context_dim]
    otherwise. QK-norm normalises each head's queries and keys (LayerNorm or RMSNorm over
    head_dim) before the dot product, which keeps large-width training stable in bf16.

    Parameter layout (what converters of released weights map to):
    - self-attention: ``to_qkv`` [3W, W] (+ bias [3W]), rows = q, k, v blocks of W rows each;
      inside a block, head h owns rows h*head_dim:(h+1)*head_dim (not interleaved per head);
    - cross-attention: ``to_q`` [W, W] on the queries and ``to_kv`` [2W, context_dim] (k rows,
      then v rows) on the context;
    - ``proj`` [W, W] output projection; ``q_norm`` / ``k_norm`` over head_dim.
    Checkpoints written before the fusion (self-attention ``to_q`` + ``to_kv``, or ``to_q`` +
    ``to_k`` + ``to_v``) are converted when loaded (same parameter count, same function).
    """

    def __init__(self, width: int, heads: int, context_dim: int | None = None, qk_norm: QKNorm = "none",
                 style: BlockStyle | None = None):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        style = style or BlockStyle()
        self.heads = heads
        self.head_dim = width // heads
        self.is_cross = context_dim is not None
        self.norm_width = style.qk_norm_scope == "width"
        if self.is_cross:
            self.to_q = nn.Linear(width, width, bias=style.qkv_bias)
            self.to_kv = nn.Linear(context_dim, 2 * width, bias=style.qkv_bias)
        else:  # initialised as the unfused to_q [W, W] and to_kv [2W, W] were: same weights per seed
            self.to_qkv = FusedLinear(width, (width, 2 * width), bias=style.qkv_bias)
        norm_dim, affine = (width, style.norm_affine) if self.norm_width else (self.head_dim, True)
        self.q_norm = make_qk_norm(qk_norm, norm_dim, affine)
        self.k_norm = make_qk_norm(qk_norm, norm_dim, affine)
        self.proj = nn.Linear(width, width)
        self.register_load_state_dict_pre_hook(Attention._load_separate_projections)

    def _load_separate_projections(self, state_dict, prefix, *args) -> None:
        if self.is_cross:
            _merge_split_projections(state_dict, prefix, ("to_k", "to_v"), "to_kv")
        else:
            _merge_split_projections(state_dict, prefix, ("to_q", "to_k", "to_v"), "to_qkv")
            _merge_split_projections(state_dict, prefix, ("to_q", "to_kv"), "to_qkv")

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_cross:
            q, (k, v) = self.to_q(x), self.to_kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)   # views [B, N, W] of one GEMM's output
        if self.norm_width:   # over all heads' channels [B, N, W], before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)) for t in (q, k, v))   # views [B, N, h, hd]
        if not self.norm_width:   # per head, over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        # SDPA takes the [B, h, N, hd] views as they are (no contiguous copies)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_ratio: float = 4.0, gelu: Literal["tanh", "exact"] = "tanh"):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, N, W] scaled and shifted per sample by shift/scale [B, W]."""
    return x * (1 + scale[:, None]) + shift[:, None]


# ---------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------

class SelfAttentionBlock(nn.Module):
    """Pre-norm self-attention + MLP (the VAE's latent transformer)."""

    def __init__(self, width: int, heads: int, style: BlockStyle = BlockStyle()):
        super().__init__()
        self.norm1 = style.norm(width)
        self.attn = Attention(width, heads, qk_norm=style.qk_norm, style=style)
        self.norm2 = style.norm(width)
        self.mlp = Mlp(width, style.mlp_ratio, style.gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SummedBlocks(nn.Module):
    """Blocks that each see the same input and one context; their outputs are summed:
    x [B, N, W] -> sum_i block_i(x, context_i). PartPacker's "dual" encoder runs two complete
    cross-attention blocks (uniform and sharp points) this way, residual and MLP included."""

    def __init__(self, blocks: Iterable[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, *contexts: torch.Tensor) -> torch.Tensor:
        if len(contexts) != len(self.blocks):
            raise ValueError(f"summed blocks expect {len(self.blocks)} contexts, got {len(contexts)}")
        return sum(block(x, context) for block, context in zip(self.blocks, contexts))


class CrossAttentionBlock(nn.Module):
    """Queries [B, N, W] attend to one or more contexts [B, L_i, W] (pre-norm on both
    sides); the attention outputs of the contexts are summed ("dual" cross-attention when
    num_contexts = 2, as in Dora), then an MLP."""

    def __init__(self, width: int, heads: int, style: BlockStyle = BlockStyle(), num_contexts: int = 1):
        super().__init__()
        self.norm_q = style.norm(width)
        self.norm_contexts = nn.ModuleList(style.norm(width) for _ in range(num_contexts))
        self.attns = nn.ModuleList(
            Attention(width, heads, context_dim=width, qk_norm=style.qk_norm, style=style) for _ in range(num_contexts))
        self.norm2 = style.norm(width)
        self.mlp = Mlp(width, style.mlp_ratio, style.gelu)

    def forward(self, x: torch.Tensor, *contexts: torch.Tensor) -> torch.Tensor:
        if len(contexts) != len(self.attns):
            raise ValueError(f"cross-attention block expects {len(self.attns)} contexts, got {len(contexts)}")
        q = self.norm_q(x)
        for attn, norm, context in zip(self.attns, self.norm_contexts, contexts):
            x = x + attn(q, norm(context))
        return x + self.mlp(self.norm2(x))


class DiTBlock(nn.Module):
    """adaLN-modulated self-attention, optional cross-attention to condition tokens
    [B, L, context_dim], adaLN-modulated MLP. The modulation is zero-initialised, so a
    fresh block is the identity (gates are 0)."""

    def __init__(self, width: int, heads: int, context_dim: int | None, style: BlockStyle):
        super().__init__()
        # the adaLN-modulated norms are always non-affine with eps 1e-6 (the modulation is the affine)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qk_norm=style.qk_norm, style=style)
        self.cross_norm = style.norm(width) if context_dim else None
        self.cross_attn = Attention(width, heads, context_dim, style.qk_norm, style) if context_dim else None
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, style.mlp_ratio, style.gelu)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.adaLN[1].weight)
        nn.init.zeros_(self.adaLN[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)  # each [B, W]
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), context)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiTFinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + linear to the output channels, all zero-initialised
    (adaln=False: a plain LayerNorm + linear, PartPacker's output layer)."""

    def __init__(self, width: int, out_dim: int, adaln: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width)) if adaln else None
        self.linear = nn.Linear(width, out_dim)
        for layer in self.zero_init_layers():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def zero_init_layers(self) -> list[nn.Linear]:
        return [self.linear] + ([self.adaLN[1]] if self.adaLN is not None else [])

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.adaLN is None:
            return self.linear(self.norm(x))
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def init_linears_xavier(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every nn.Linear (run before zero-inits)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            for block in m.weight.split(getattr(m, "splits", (m.out_features,))):
                nn.init.xavier_uniform_(block)   # a fused layer: each block as its own layer
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------
# 3D convolution blocks
# ---------------------------------------------------------------------------

def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock3d(nn.Module):
    """GroupNorm-SiLU-Conv3d twice with a residual (1x1x1 conv when channels change)."""

    def __init__(self, in_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.block = nn.Sequential(
            group_norm(in_channels), nn.SiLU(), nn.Conv3d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels), nn.SiLU(), nn.Conv3d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Downsample3d(nn.Module):
    """Stride-2 Conv3d with a 2x2x2 kernel: exact halving of every axis (sizes must be even)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3d(nn.Module):
    """Conv3d to out_channels*8 then pixel_shuffle_3d: doubles every axis."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


# ---------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------

class CheckpointedBlocks(nn.Module):
    """A list of blocks run in order; with ``every = k > 0`` the blocks 0, k, 2k, ... are
    run under non-reentrant torch.utils.checkpoint (their activations are recomputed in
    backward). ``every`` can be changed at any time (set_activation_checkpointing)."""

    def __init__(self, blocks: Iterable[nn.Module], every: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.every = every

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        use_checkpoint = self.every > 0 and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if use_checkpoint and i % self.every == 0:
                x = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)
        return x


class ActivationCheckpointing:
    """Mixin of the four networks: ``set_activation_checkpointing`` for their CheckpointedBlocks."""

    def set_activation_checkpointing(self, every: int) -> None:
        """Checkpoint every ``every``-th block of all CheckpointedBlocks inside (0 = off); the config
        records it (``checkpoint_every``) so a rebuilt network does the same."""
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"checkpoint_every must be an int >= 0, got {every!r}")
        for m in self.modules():
            if isinstance(m, CheckpointedBlocks):
                m.every = every
        self.config.checkpoint_every = every
