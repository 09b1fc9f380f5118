"""VecSet VAE and voxel VAE: shapes, token counts, permutation invariance, checkpointing,
and overfitting two analytic shapes (a sphere and a box) from their surface samples."""
import pytest
import torch
import torch.nn.functional as F

import models


def random_surface(batch, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(batch, count, 3, generator=g) * 2 - 1
    normals = F.normalize(torch.randn(batch, count, 3, generator=g), dim=-1)
    return points, normals


# ---------------------------------------------------------------------------
# VecSet VAE
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("sharp_mode", ["concat", "dual"])
def test_vecset_vae_shapes_with_and_without_sharp_points(sharp_mode):
    torch.manual_seed(0)
    vae = models.build("vecset_vae/debug", sharp_mode=sharp_mode)
    cfg = vae.config
    points, normals = random_surface(2, 100)
    sharp, sharp_normals = random_surface(2, 50, seed=1)
    xyz = torch.rand(2, 77, 3) * 2 - 1
    values, post = vae(points, normals, xyz, sharp, sharp_normals)
    assert values.shape == (2, 77)
    assert post.mean.shape == (2, cfg.num_latents + cfg.num_sharp_latents, cfg.latent_channels)
    assert post.kl().shape == (2,)
    values, post = vae(points, normals, xyz)  # no sharp points: uniform tokens only
    assert values.shape == (2, 77) and post.mean.shape == (2, cfg.num_latents, cfg.latent_channels)


def test_vecset_vae_any_token_count_and_split_api():
    torch.manual_seed(0)
    vae = models.build("vecset_vae/debug")
    points, normals = random_surface(1, 64)
    sharp, sharp_normals = random_surface(1, 40, seed=1)
    xyz = torch.rand(1, 30, 3)
    for ku, ks in [(1, 0), (7, 3), (64, 40)]:
        post = vae.encode(points, normals, sharp, sharp_normals, num_latents=ku, num_sharp_latents=ks)
        assert post.mean.shape == (1, ku + ks, vae.config.latent_channels)
        hidden = vae.decode(post.mode())
        assert hidden.shape == (1, ku + ks, vae.config.width)
        # querying in chunks gives the same values as querying all points at once
        whole = vae.query(hidden, xyz)
        chunks = torch.cat([vae.query(hidden, xyz[:, :11]), vae.query(hidden, xyz[:, 11:])], dim=1)
        assert torch.allclose(whole, chunks, atol=1e-5)
    with pytest.raises(ValueError, match="only 64 points"):
        vae.encode(points, normals, num_latents=65)
    with pytest.raises(ValueError, match="normals"):
        vae.encode(points)


@pytest.mark.parametrize("sharp_mode", ["concat", "dual"])
def test_vecset_encoder_is_permutation_invariant_given_same_queries(sharp_mode):
    torch.manual_seed(0)
    vae = models.build("vecset_vae/debug", sharp_mode=sharp_mode).eval()
    points, normals = random_surface(2, 120)
    sharp, sharp_normals = random_surface(2, 60, seed=1)
    ku, ks = vae.config.num_latents, vae.config.num_sharp_latents
    reference = vae.encode(points, normals, sharp, sharp_normals).mean
    # permute everything after the FPS prefix: the prefix queries are unchanged
    perm = torch.cat([torch.arange(ku), ku + torch.randperm(120 - ku)])
    sperm = torch.cat([torch.arange(ks), ks + torch.randperm(60 - ks)])
    shuffled = vae.encode(points[:, perm], normals[:, perm], sharp[:, sperm], sharp_normals[:, sperm]).mean
    assert torch.allclose(shuffled, reference, atol=1e-5)
    # permute all points and pass the queries' new positions explicitly
    perm, sperm = torch.randperm(120), torch.randperm(60)
    where, swhere = torch.argsort(perm), torch.argsort(sperm)  # new index of old row i
    index = where[:ku].expand(2, -1)
    sindex = swhere[:ks].expand(2, -1)
    shuffled = vae.encode(points[:, perm], normals[:, perm], sharp[:, sperm], sharp_normals[:, sperm],
                          query_index=index, sharp_query_index=sindex).mean
    assert torch.allclose(shuffled, reference, atol=1e-5)
    # sanity: a different query set changes the latents (the test above could not pass trivially)
    other = vae.encode(points.flip(1), normals.flip(1), sharp, sharp_normals).mean
    assert not torch.allclose(other, reference, atol=1e-3)


def test_vecset_vae_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    vae = models.build("vecset_vae/debug", encoder_layers=2, decoder_layers=3)
    points, normals = random_surface(2, 80)
    xyz = torch.rand(2, 40, 3)

    def run(every):
        vae.set_activation_checkpointing(every)
        vae.zero_grad()
        values, post = vae(points, normals, xyz, sample_posterior=False)
        (values.square().mean() + post.kl().mean()).backward()
        return values.detach(), [p.grad.clone() for p in vae.parameters() if p.grad is not None]

    base_out, base_grads = run(0)
    for every in (1, 2):
        out, grads = run(every)
        assert vae.config.checkpoint_every == every
        assert torch.allclose(out, base_out, atol=1e-6)
        assert len(grads) == len(base_grads)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, base_grads))


def sphere_sdf(x, center, radius):
    return (x - center).norm(dim=-1) - radius


def box_sdf(x, center, half):
    q = (x - center).abs() - half
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)


def sphere_surface(count, center, radius, g):
    normals = F.normalize(torch.randn(count, 3, generator=g), dim=-1)
    return center + radius * normals, normals


def box_surface(count, center, half, g):
    areas = torch.stack([half[1] * half[2], half[0] * half[2], half[0] * half[1]]).repeat(2)
    face = torch.multinomial(areas, count, replacement=True, generator=g)  # area-weighted faces
    axis, sign = face % 3, (face // 3) * 2 - 1.0
    rows = torch.arange(count)
    points = (torch.rand(count, 3, generator=g) * 2 - 1) * half
    points[rows, axis] = sign * half[axis]
    normals = torch.zeros(count, 3)
    normals[rows, axis] = sign
    return center + points, normals


def iou(a, b):
    return ((a & b).sum() / (a | b).sum()).item()


@pytest.mark.slow
def test_vecset_vae_overfits_two_analytic_shapes():
    """A sphere and a disjoint box: each reconstruction must reach IoU > 0.85, which a model
    that ignores its input points (one average shape) cannot (its IoU is < 0.5 for one of them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is as fast and immune to busy cores
    try:
        overfit_two_shapes()
    finally:
        torch.set_num_threads(threads)


def overfit_two_shapes():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sphere_c, radius = torch.tensor([-0.45, -0.1, 0.1]), 0.4
    box_c, half = torch.tensor([0.45, 0.2, -0.1]), torch.tensor([0.3, 0.4, 0.25])
    sdfs = [lambda x: sphere_sdf(x, sphere_c, radius), lambda x: box_sdf(x, box_c, half)]
    surfaces = [sphere_surface(512, sphere_c, radius, g), box_surface(512, box_c, half, g)]
    points = torch.stack([s[0] for s in surfaces])
    normals = torch.stack([s[1] for s in surfaces])
    for i in range(2):  # the analytic surface samples lie on the zero level set
        assert sdfs[i](points[i]).abs().max() < 1e-5

    vae = models.build("vecset_vae/debug", num_sharp_latents=0, encoder_layers=0)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    tau = 0.1  # truncation of the SDF target
    for _ in range(350):
        uniform = torch.rand(2, 1024, 3, generator=g) * 2.1 - 1.05
        near = points[:, torch.randint(0, 512, (512,), generator=g)] + 0.05 * torch.randn(2, 512, 3, generator=g)
        xyz = torch.cat([uniform, near], dim=1)
        target = torch.stack([sdfs[i](xyz[i]) for i in range(2)]).div(tau).clamp(-1, 1)
        values, _ = vae(points, normals, xyz, sample_posterior=False)
        loss = F.mse_loss(values, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.06

    axis = torch.linspace(-1, 1, 24)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(1, -1, 3).expand(2, -1, -1)
    with torch.no_grad():
        values = vae.query(vae.decode(vae.encode(points, normals).mode()), grid)
    for i in range(2):
        assert iou(values[i] < 0, sdfs[i](grid[i]) < 0) > 0.85
    assert iou(values[0] < 0, sdfs[1](grid[0]) < 0) < 0.1  # the sphere's code does not give the box


# ---------------------------------------------------------------------------
# Voxel VAE
# ---------------------------------------------------------------------------

def test_voxel_vae_shapes_non_cubic():
    torch.manual_seed(0)
    vae = models.build("voxel_vae/debug")
    f = vae.config.downsample_factor
    grid = (torch.rand(2, 1, 8 * f // 2, 6 * f // 2, 4 * f // 2) > 0.5).float()
    logits, post = vae(grid)
    assert logits.shape == grid.shape
    assert post.mean.shape == (2, vae.config.latent_channels, *(n // f for n in grid.shape[2:]))
    assert vae.decode(post.mode()).shape == grid.shape
    with pytest.raises(ValueError, match="not divisible"):
        vae.encode(torch.zeros(1, 1, 5, 8, 8))


def test_voxel_vae_three_levels_and_checkpointing():
    torch.manual_seed(0)
    vae = models.build("voxel_vae/debug", channels=(4, 8, 8))
    grid = (torch.rand(1, 1, 8, 12, 16) > 0.5).float()
    assert vae.config.downsample_factor == 4

    def run(every):
        vae.set_activation_checkpointing(every)
        vae.zero_grad()
        logits, post = vae(grid, sample_posterior=False)
        F.binary_cross_entropy_with_logits(logits, grid).backward()
        return logits.detach(), post.mean.shape, [p.grad.clone() for p in vae.parameters()]

    out, latent_shape, grads = run(0)
    assert latent_shape == (1, vae.config.latent_channels, 2, 3, 4) and out.shape == grid.shape
    out2, _, grads2 = run(2)
    assert torch.allclose(out, out2, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, grads2))
