"""VecSet DiT and voxel DiT: shapes, zero output at init, conditioning modes, CFG null
condition, activation checkpointing, bf16."""
import copy

import pytest
import torch

import models


def dit_inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if isinstance(cfg, models.VoxelDiTConfig):
        x = torch.randn(batch, cfg.in_channels, 4, 6, 8, generator=g)  # D != H != W
    else:
        x = torch.randn(batch, 24, cfg.in_channels, generator=g)
    t = torch.rand(batch, generator=g)
    cond = {"tokens": lambda: torch.randn(batch, 5, cfg.condition_dim, generator=g),
            "class": lambda: torch.randint(0, cfg.num_classes, (batch,), generator=g),
            "none": lambda: None}[cfg.condition]()
    return x, t, cond


def perturb(model):
    """Move every parameter off its init so zero-initialised paths carry signal."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


FAMILIES = ["vecset_dit/debug", "voxel_dit/debug"]
CONDITIONS = [dict(), dict(condition="class", num_classes=7), dict(condition="none"),
              dict(null_condition="zero")]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("overrides", CONDITIONS)
def test_fresh_dit_outputs_exactly_zero_with_input_shape(name, overrides):
    torch.manual_seed(0)
    model = models.build(name, **overrides)
    x, t, cond = dit_inputs(model)
    out = model(x, t, cond)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))
    perturbed = perturb(model)(x, t, cond)
    assert perturbed.abs().mean() > 1e-3  # the zeros above came from the init, not the wiring


@pytest.mark.parametrize("name", FAMILIES)
def test_dit_output_depends_on_time_condition_and_input(name):
    torch.manual_seed(0)
    model = perturb(models.build(name))
    x, t, cond = dit_inputs(model)
    out = model(x, t, cond)
    assert not torch.allclose(out, model(x, t.flip(0) * 0.5, cond), atol=1e-4)
    assert not torch.allclose(out, model(x, t, cond.flip(0)), atol=1e-4)
    assert not torch.allclose(out, model(x.flip(0), t, cond), atol=1e-4)
    assert model(x, 0.3, cond).shape == x.shape  # scalar t


def test_vecset_dit_any_token_count_and_permutation_equivariance():
    torch.manual_seed(0)
    model = perturb(models.build("vecset_dit/debug"))
    _, t, cond = dit_inputs(model)
    for n in (1, 13, 64):
        x = torch.randn(2, n, model.config.in_channels)
        out = model(x, t, cond)
        perm = torch.randperm(n)
        assert torch.allclose(model(x[:, perm], t, cond), out[:, perm], atol=1e-5)  # no positional embedding


def test_voxel_dit_positional_embedding_breaks_equivariance():
    torch.manual_seed(0)
    model = perturb(models.build("voxel_dit/debug"))
    x, t, cond = dit_inputs(model)
    out = model(x, t, cond)
    assert not torch.allclose(model(x.flip(2), t, cond).flip(2), out, atol=1e-4)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model(torch.randn(1, model.config.in_channels, 3, 4, 4), t[:1], cond[:1])


@pytest.mark.parametrize("name", FAMILIES)
def test_null_condition_and_drop(name):
    model = perturb(models.build(name))
    x, t, cond = dit_inputs(model)
    null = model.null_condition(2, num_tokens=5)
    assert null.shape == cond.shape
    dropped = model.drop_condition(cond, torch.tensor([True, False]))
    assert torch.equal(dropped[0], null[0]) and torch.equal(dropped[1], cond[1])
    assert torch.allclose(model(x, t, None), model(x, t, model.null_condition(2)), atol=1e-6)
    # the learned null token is a parameter the optimiser trains; the zero one is not
    assert any(p is model.trunk.null_token for p in model.parameters())
    zero = models.build(name, null_condition="zero")
    assert torch.equal(zero.null_condition(2), torch.zeros(2, 1, zero.config.condition_dim))
    assert not any(p is zero.trunk.null_token for p in zero.parameters())


def test_class_conditioning_null_class():
    model = perturb(models.build("vecset_dit/debug", condition="class", num_classes=3))
    assert torch.equal(model.null_condition(2), torch.tensor([3, 3]))
    dropped = model.drop_condition(torch.tensor([0, 2]), torch.tensor([False, True]))
    assert torch.equal(dropped, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="class ids"):
        model(torch.randn(2, 4, 8), torch.rand(2), torch.randn(2, 1, 32))


def test_unconditional_dit_rejects_condition():
    model = models.build("vecset_dit/debug", condition="none")
    assert model.null_condition(2) is None and model.drop_condition(None, torch.tensor([True])) is None
    assert not any(b.cross_attn for b in model.trunk.blocks.blocks)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 4, 8), torch.rand(1), torch.randn(1, 2, 32))


@pytest.mark.parametrize("name", FAMILIES)
def test_dit_checkpointing_same_outputs_and_grads(name):
    torch.manual_seed(0)
    model = perturb(models.build(name, depth=4))
    x, t, cond = dit_inputs(model)

    def run(every):
        model.set_activation_checkpointing(every)
        model.zero_grad()
        out = model(x, t, cond)
        out.square().mean().backward()
        # the null token gets no gradient when every sample is conditioned
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    out0, grads0 = run(0)
    for every in (1, 3):
        out, grads = run(every)
        assert torch.allclose(out, out0, atol=1e-6)
        assert len(grads) == len(grads0) == len(list(model.parameters())) - 1
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, grads0))
    with pytest.raises(ValueError, match="checkpoint_every"):
        model.set_activation_checkpointing(-1)


BF16_REL = 0.03   # measured 7e-3 (output and gradients, both families); garbage casts give ~1


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("name", FAMILIES)
def test_dit_bf16_forward_backward_matches_fp32(name):
    """The same network in bf16 computes what it computes in fp32, to bf16 precision (8 mantissa bits:
    ~0.4% per rounding): output and gradients within BF16_REL (relative L2)."""
    torch.manual_seed(0)
    fp32 = perturb(models.build(name))
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    x, t, cond = dit_inputs(fp32)
    want = fp32(x, t, cond)
    out = bf16(x.bfloat16(), t, cond.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert relative_l2(out, want) < BF16_REL, relative_l2(out, want)
    want.square().mean().backward()
    out.float().square().mean().backward()
    pairs = [(a.grad, b.grad) for a, b in zip(bf16.parameters(), fp32.parameters()) if b.grad is not None]
    assert pairs and all(a is not None and torch.isfinite(a).all() for a, _ in pairs)
    flat = [torch.cat([a.float().flatten() for a, _ in pairs]), torch.cat([b.flatten() for _, b in pairs])]
    print(f"{name}: bf16 vs fp32 output {relative_l2(out, want):.2e}, gradients {relative_l2(*flat):.2e}")
    assert relative_l2(*flat) < BF16_REL, relative_l2(*flat)


@pytest.mark.parametrize("name", FAMILIES)
def test_condition_tokens_are_layer_normalised(name):
    """A per-token affine change of the condition tokens (scale, offset) does not change the output."""
    model = perturb(models.build(name))
    x, t, cond = dit_inputs(model)
    changed = cond * 7.0 + 3.0
    assert torch.allclose(model(x, t, cond), model(x, t, changed), atol=1e-4)
    assert not torch.allclose(model(x, t, cond), model(x, t, cond.flip(-1)), atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_class_conditions_through_the_adaln_input(name):
    """The class embedding is added to the timestep embedding (no cross-attention over one token)."""
    model = perturb(models.build(name, condition="class", num_classes=3))
    assert all(block.cross_attn is None for block in model.trunk.blocks.blocks)
    x, t, _ = dit_inputs(model)
    labels = torch.tensor([0, 2])
    out = model(x, t, labels)
    assert not torch.allclose(out, model(x, t, torch.tensor([1, 1])), atol=1e-5)
    trunk = model.trunk   # the same velocity from c = t embedding + class embedding, no context
    c = trunk.t_embedder(t, 2) + trunk.class_embed(labels)
    tokens = model.proj_in(x) if name.startswith("vecset") else None
    if tokens is not None:
        assert torch.allclose(out, trunk.final(trunk.blocks(tokens, c, None), c), atol=1e-5)
    null = model(x, t, model.null_condition(2))
    assert torch.allclose(null, model(x, t, None), atol=1e-6) and not torch.allclose(null, out, atol=1e-5)
