"""Objective maths: flow conventions, CFG, VAE losses and metrics (pure functions, CPU, fast)."""
import math

import pytest
import torch

from trainer import objectives as obj


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_logit_normal_moments_match_the_normal_in_logit_space():
    t = obj.sample_logit_normal_t(200_000, m=0.5, s=0.8, generator=gen())
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean()) - 0.5) < 0.01
    assert abs(float(logit.std()) - 0.8) < 0.01
    assert float(t.min()) >= obj.T_EPS and float(t.max()) <= 1 - obj.T_EPS


def test_logit_normal_default_is_symmetric_around_one_half():
    t = obj.sample_logit_normal_t(200_000, generator=gen(1))
    assert abs(float(t.mean()) - 0.5) < 0.005
    assert abs(float(torch.median(t)) - 0.5) < 0.005


def test_shift_moves_mass_towards_noise_and_fixes_endpoints():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    shifted = obj.shift_time(t, 3.0)
    assert shifted[0] == 0.0 and shifted[-1] == 1.0
    assert torch.allclose(shifted[2], torch.tensor(0.75))  # 3*0.5 / (1 + 2*0.5)
    assert (shifted[1:3] > t[1:3]).all()
    plain = obj.sample_logit_normal_t(50_000, generator=gen(2))
    moved = obj.sample_logit_normal_t(50_000, shift=3.0, generator=gen(2))
    assert torch.allclose(moved, obj.shift_time(plain, 3.0).clamp(obj.T_EPS, 1 - obj.T_EPS))
    assert float(moved.mean()) > float(plain.mean()) + 0.1


def test_saturated_sigmoid_is_clamped_inside_the_open_interval():
    t = obj.sample_logit_normal_t(1000, m=0.0, s=100.0, generator=gen(3))
    assert float(t.min()) > 0.0 and float(t.max()) < 1.0


def test_interpolation_endpoints_and_target_sign():
    x0, eps = torch.randn(4, 8, 3), torch.randn(4, 8, 3)
    assert torch.equal(obj.interpolate(x0, eps, torch.zeros(4)), x0)   # t = 0 is data
    assert torch.equal(obj.interpolate(x0, eps, torch.ones(4)), eps)   # t = 1 is noise
    v = obj.velocity_target(x0, eps)
    assert torch.equal(v, eps - x0)
    # v is the time derivative of x_t: finite difference along t
    t, h = torch.full((4,), 0.3), 1e-3
    fd = (obj.interpolate(x0, eps, t + h) - obj.interpolate(x0, eps, t)) / h
    assert torch.allclose(fd, v, atol=1e-3)


def test_per_sample_loss_and_t_bins():
    pred, target = torch.zeros(4, 2, 2), torch.ones(4, 2, 2) * torch.tensor([1., 2., 3., 4.]).view(4, 1, 1)
    per = obj.flow_loss_per_sample(pred, target)
    assert torch.allclose(per, torch.tensor([1., 4., 9., 16.]))
    bins = obj.loss_per_t_bin(per, torch.tensor([0.1, 0.2, 0.6, 0.99]), n_bins=2)
    assert bins == {0: (5.0, 2), 1: (25.0, 2)}


def test_condition_dropout_rate():
    mask = obj.condition_dropout_mask(100_000, 0.1, generator=gen(4))
    assert mask.dtype == torch.bool
    assert abs(float(mask.float().mean()) - 0.1) < 0.005
    assert not obj.condition_dropout_mask(100, 0.0).any()
    assert obj.condition_dropout_mask(100, 1.0).all()


def test_cfg_mix_endpoints_and_extrapolation():
    vu, vc = torch.zeros(3), torch.ones(3)
    assert torch.equal(obj.cfg_mix(vu, vc, 0.0), vu)
    assert torch.equal(obj.cfg_mix(vu, vc, 1.0), vc)
    assert torch.equal(obj.cfg_mix(vu, vc, 7.0), torch.full((3,), 7.0))


def test_sampling_times_run_from_noise_to_data_with_the_shift():
    times = obj.sampling_times(10, shift=3.0)
    assert times[0] == 1.0 and times[-1] == 0.0
    assert (times[1:] < times[:-1]).all()
    assert torch.allclose(times, obj.shift_time(torch.linspace(1, 0, 11), 3.0))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_sampler_is_exact_for_the_true_straight_line_field(shift):
    # For a single known data point the optimal velocity is (x_t - x0) / t, constant along straight paths:
    # Euler integrates it exactly for any step count and any shift.
    x0, noise = torch.randn(2, 5), torch.randn(2, 5)
    field = lambda x, t: (x - x0) / t.view(-1, 1)  # noqa: E731
    out = obj.euler_sample(field, noise, steps=3, shift=shift)
    assert torch.allclose(out, x0, atol=1e-5)


def test_euler_sampler_integrates_a_constant_field_exactly():
    v = torch.randn(2, 5)
    noise = torch.randn(2, 5)
    out = obj.euler_sample(lambda x, t: v, noise, steps=7, shift=2.0)
    assert torch.allclose(out, noise - v, atol=1e-6)  # x(0) = x(1) - integral_0^1 v dt


def test_truncated_sdf_regression_and_bce():
    sdf = torch.tensor([-0.5, -0.01, 0.0, 0.02, 0.3])
    target = obj.truncate_sdf(sdf, 0.05)
    assert torch.allclose(target, torch.tensor([-1.0, -0.2, 0.0, 0.4, 1.0]))
    perfect = obj.sdf_regression_loss(target, sdf, 0.05)
    assert float(perfect["recon"]) == 0.0
    off = obj.sdf_regression_loss(target + 0.5, sdf, 0.05)
    assert math.isclose(float(off["mse"]), 0.25, rel_tol=1e-6) and math.isclose(float(off["l1"]), 0.5, rel_tol=1e-6)
    good = obj.occupancy_bce_loss(torch.tensor([10.0, -10.0]), torch.tensor([-0.1, 0.1]) < 0)
    bad = obj.occupancy_bce_loss(torch.tensor([-10.0, 10.0]), torch.tensor([-0.1, 0.1]) < 0)
    assert float(good["recon"]) < 1e-3 < 5.0 < float(bad["recon"])


def test_kl_weight_warmup():
    assert obj.kl_weight(0, 1e-3, 0) == 1e-3
    assert obj.kl_weight(0, 1e-3, 100) == 0.0
    assert math.isclose(obj.kl_weight(50, 1e-3, 100), 5e-4)
    assert obj.kl_weight(500, 1e-3, 100) == 1e-3


def test_eikonal_is_zero_for_a_true_distance_field():
    pts = torch.randn(64, 3, requires_grad=True)
    sphere_sdf = pts.norm(dim=-1) - 0.5
    grad = obj.spatial_gradient(sphere_sdf, pts)
    assert float(obj.eikonal_loss(grad.detach())) < 1e-10
    assert float(obj.eikonal_loss(2 * grad.detach())) == pytest.approx(1.0, rel=1e-5)


def test_volume_iou():
    true = torch.tensor([[-1.0, -1.0, 1.0, 1.0]])
    assert torch.allclose(obj.volume_iou(true, true), torch.ones(1))
    half = torch.tensor([[-1.0, 1.0, 1.0, 1.0]])
    assert torch.allclose(obj.volume_iou(half, true), torch.tensor([0.5]))
    empty = torch.ones(1, 4)
    assert torch.allclose(obj.volume_iou(empty, empty), torch.ones(1))


def test_chamfer_and_fscore():
    pts = torch.rand(500, 3)
    same = obj.chamfer_and_fscore(pts, pts, threshold=0.01)
    assert same["chamfer"] == 0.0 and same["fscore"] == 1.0
    moved = obj.chamfer_and_fscore(pts + torch.tensor([0.1, 0.0, 0.0]), pts, threshold=0.01)
    assert moved["fscore"] < 0.2 and moved["chamfer"] > 0.01
