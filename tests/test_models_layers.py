"""Shared layers: 3D reshapes, positional features, posterior, attention, checkpoint helper."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.layers import (
    Attention,
    CheckpointedBlocks,
    DiagonalGaussian,
    FourierEmbedder,
    SelfAttentionBlock,
    TimestepEmbedder,
    init_linears_xavier,
    patchify_3d,
    pixel_shuffle_3d,
    pixel_unshuffle_3d,
    sincos_pos_embed_3d,
    unpatchify_3d,
)


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_pixel_shuffle_3d_is_exact_inverse_on_non_cubic_grids(factor):
    x = torch.randn(2, 3 * factor**3, 2, 3, 5)  # D != H != W
    y = pixel_shuffle_3d(x, factor)
    assert y.shape == (2, 3, 2 * factor, 3 * factor, 5 * factor)
    assert torch.equal(pixel_unshuffle_3d(y, factor), x)
    z = torch.randn(1, 2, 4 * factor, 2 * factor, 6 * factor)
    assert torch.equal(pixel_shuffle_3d(pixel_unshuffle_3d(z, factor), factor), z)


def test_pixel_shuffle_3d_layout_matches_definition():
    # channel c*r^3 + i*r^2 + j*r + k of voxel (d, h, w) lands at (d*r+i, h*r+j, w*r+k)
    r, (d, h, w) = 2, (2, 3, 4)
    x = torch.randn(1, 2 * r**3, d, h, w)
    y = pixel_shuffle_3d(x, r)
    for c in range(2):
        for i in range(r):
            for j in range(r):
                for k in range(r):
                    src = x[0, c * r**3 + i * r * r + j * r + k]
                    assert torch.equal(y[0, c, i::r, j::r, k::r], src)


def test_pixel_shuffle_3d_reduces_to_2d_pixel_shuffle_semantics():
    # for a fixed depth offset i, the (h, w) interleaving must equal torch's 2D pixel_shuffle
    x = torch.randn(1, 8, 1, 3, 5)
    y = pixel_shuffle_3d(x, 2)  # [1, 1, 2, 6, 10]
    for i in range(2):
        plane = x[:, i * 4:(i + 1) * 4, 0]  # channels with d-offset i: [1, 4, 3, 5]
        assert torch.equal(y[:, 0, i], F.pixel_shuffle(plane, 2)[:, 0])


def test_pixel_unshuffle_3d_rejects_indivisible_grid():
    with pytest.raises(ValueError, match="not divisible"):
        pixel_unshuffle_3d(torch.randn(1, 1, 4, 3, 4), 2)


def test_patchify_unpatchify_round_trip_non_cubic():
    x = torch.randn(2, 3, 4, 6, 8)
    tokens = patchify_3d(x, 2)
    assert tokens.shape == (2, 2 * 3 * 4, 3 * 8)
    assert torch.equal(unpatchify_3d(tokens, 2, (2, 3, 4)), x)
    # token n covers the patch at (d, h, w) in C order, its features hold the patch's voxels
    d, h, w = 1, 2, 3
    n = (d * 3 + h) * 4 + w
    patch = x[0, :, 2 * d:2 * d + 2, 2 * h:2 * h + 2, 2 * w:2 * w + 2].reshape(-1)
    assert torch.equal(tokens[0, n], patch)


def test_sincos_pos_embed_3d_distinct_and_bounded():
    emb = sincos_pos_embed_3d(64, (2, 3, 4))
    assert emb.shape == (24, 64)
    assert emb.abs().max() <= 1.0
    assert torch.cdist(emb, emb).add(torch.eye(24) * 10).min() > 0.1  # every position distinct


def test_fourier_embedder_shape_and_content():
    emb = FourierEmbedder(4)
    xyz = torch.rand(2, 5, 3)
    out = emb(xyz)
    assert out.shape == (2, 5, 3 + 6 * 4) and emb.out_dim == 27
    assert torch.equal(out[..., :3], xyz)
    assert torch.allclose(out[..., 3], torch.sin(math.pi * xyz[..., 0]))


def test_timestep_embedder_accepts_scalar_and_batch():
    emb = TimestepEmbedder(32)
    assert emb(torch.tensor(0.5), 3).shape == (3, 32)
    out = emb(torch.tensor([0.0, 1.0]), 2)
    assert out.shape == (2, 32) and not torch.allclose(out[0], out[1])


def test_kl_is_zero_for_standard_normal_and_positive_otherwise():
    zero = DiagonalGaussian(torch.zeros(3, 4, 5), torch.zeros(3, 4, 5))
    assert torch.equal(zero.kl(), torch.zeros(3))
    other = DiagonalGaussian(torch.full((3, 4, 5), 0.5), torch.full((3, 4, 5), -1.0))
    expected = 0.5 * (0.25 + math.exp(-1.0) - 1.0 + 1.0)
    assert torch.allclose(other.kl(), torch.full((3,), expected))


def test_diagonal_gaussian_sample_statistics_and_mode():
    mean, logvar = torch.full((1, 20000), 2.0), torch.full((1, 20000), math.log(0.25))
    post = DiagonalGaussian(mean, logvar)
    s = post.sample(torch.Generator().manual_seed(0))
    assert abs(s.mean().item() - 2.0) < 0.02 and abs(s.std().item() - 0.5) < 0.02
    assert torch.equal(post.mode(), mean)


@pytest.mark.parametrize("qk_norm", ["none", "layernorm", "rmsnorm"])
def test_attention_matches_naive_softmax(qk_norm):
    torch.manual_seed(0)
    attn = Attention(16, 4, context_dim=8, qk_norm=qk_norm)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    q = attn.q_norm(attn.to_q(x).view(2, 5, 4, 4).transpose(1, 2))
    k, v = attn.to_kv(ctx).chunk(2, -1)
    k = attn.k_norm(k.view(2, 7, 4, 4).transpose(1, 2))
    v = v.view(2, 7, 4, 4).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attn(x, ctx), expected, atol=1e-5)


def test_checkpointed_blocks_every_k_same_outputs_and_grads():
    torch.manual_seed(0)
    blocks = CheckpointedBlocks([SelfAttentionBlock(16, 2) for _ in range(4)])
    x = torch.randn(2, 6, 16, requires_grad=True)
    results = []
    for every in (0, 1, 3):
        blocks.every = every
        x.grad = None
        blocks.zero_grad()
        y = blocks(x)
        y.square().sum().backward()
        results.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in blocks.parameters()]))
    for y, gx, gp in results[1:]:
        assert torch.allclose(y, results[0][0], atol=1e-6)
        assert torch.allclose(gx, results[0][1], atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(gp, results[0][2]))


def naive_attention(x, ctx, wq, bq, wk, bk, wv, bv, attn, heads):
    """Attention computed from separate q/k/v weights (the layout of checkpoints before the fusion)."""
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    q = attn.q_norm(split(F.linear(x, wq, bq)))
    k, v = attn.k_norm(split(F.linear(ctx, wk, bk))), split(F.linear(ctx, wv, bv))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("layout", ["q_kv", "q_k_v"])
def test_self_attention_loads_checkpoints_with_separate_projections(layout):
    torch.manual_seed(0)
    attn = Attention(16, 4, qk_norm="layernorm")
    wq, wk, wv = (torch.randn(16, 16) / 4 for _ in range(3))
    bq, bk, bv = (torch.randn(16) for _ in range(3))
    old = {k: v for k, v in attn.state_dict().items() if not k.startswith("to_qkv")}
    if layout == "q_kv":
        old.update({"to_q.weight": wq, "to_q.bias": bq, "to_kv.weight": torch.cat([wk, wv]),
                    "to_kv.bias": torch.cat([bk, bv])})
    else:
        old.update({"to_q.weight": wq, "to_q.bias": bq, "to_k.weight": wk, "to_k.bias": bk,
                    "to_v.weight": wv, "to_v.bias": bv})
    attn.load_state_dict(old)   # strict: every old key is consumed, every new key filled
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(attn(x), naive_attention(x, x, wq, bq, wk, bk, wv, bv, attn, 4))


def test_fused_qkv_keeps_parameter_count_and_initial_weights():
    """to_qkv [3W, W] holds what to_q [W, W] and to_kv [2W, W] held, initialised block by block."""
    attn = Attention(32, 4)
    assert attn.to_qkv.weight.shape == (96, 32) and sum(p.numel() for p in attn.parameters()) == 4 * (32 * 32 + 32)
    torch.manual_seed(0)
    init_linears_xavier(attn)
    torch.manual_seed(0)
    q, kv = torch.empty(32, 32), torch.empty(64, 32)
    torch.nn.init.xavier_uniform_(q)
    torch.nn.init.xavier_uniform_(kv)
    assert torch.equal(attn.to_qkv.weight, torch.cat([q, kv]))
