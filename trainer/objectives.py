"""Training objectives and metrics as pure functions (no networks, no optimisers, no distributed code).

Conventions (docs/design.md section 2), used by every function below:

* Rectified flow: ``x_t = (1 - t) * x0 + t * eps`` with ``x0`` the data latent and ``eps ~ N(0, I)``.
  ``t = 0`` is data, ``t = 1`` is noise. The network predicts the velocity ``v = eps - x0`` (= dx_t/dt).
* Training times: ``t = sigmoid(n)``, ``n ~ N(m, s)`` (logit-normal), optionally shifted with
  ``t' = a * t / (1 + (a - 1) * t)`` (``a > 1`` moves mass towards noise), clamped to
  ``[T_EPS, 1 - T_EPS]`` so no sample is pure data or pure noise.
* Sampling integrates ``dx/dt = v`` from ``t = 1`` to ``t = 0`` on a uniform grid mapped through the same shift.
* Classifier-free guidance: during training the condition is dropped with probability ``p_uncond``;
  at sampling ``v = v_uncond + w * (v_cond - v_uncond)``.
* SDF: negative inside, positive outside; occupancy = ``sdf < 0``. The truncated SDF target is
  ``clip(sdf, -tau, tau) / tau`` in [-1, 1].
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

T_EPS = 1e-5  # keeps t strictly inside (0, 1): avoids degenerate targets and index overflow


# ---------------------------------------------------------------------------
# Rectified flow
# ---------------------------------------------------------------------------

def shift_time(t: Tensor, shift: float) -> Tensor:
    """t' = a t / (1 + (a - 1) t); identity for a = 1, monotone, fixes 0 and 1."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_logit_normal_t(
    n: int, *, m: float = 0.0, s: float = 1.0, shift: float = 1.0,
    generator: torch.Generator | None = None, device: torch.device | str | None = None,
) -> Tensor:
    """[n] training times t = shift(sigmoid(N(m, s))), clamped to [T_EPS, 1 - T_EPS]."""
    normal = torch.randn(n, generator=generator, device=device) * s + m
    t = shift_time(torch.sigmoid(normal), shift)
    return t.clamp(T_EPS, 1.0 - T_EPS)


def _expand_like(t: Tensor, x: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against x [B, ...]."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps; x0, eps [B, ...], t [B]."""
    tb = _expand_like(t, x0)
    return (1.0 - tb) * x0 + tb * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """v = eps - x0 (the time derivative of x_t)."""
    return eps - x0


def flow_loss_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """[B] mean squared error over all non-batch dims (computed in fp32)."""
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def loss_per_t_bin(per_sample: Tensor, t: Tensor, n_bins: int = 4) -> dict[int, tuple[float, int]]:
    """{bin index: (sum of losses, count)} over equal-width t bins; sums/counts so ranks can be merged."""
    idx = (t.detach().float() * n_bins).long().clamp(0, n_bins - 1)
    out: dict[int, tuple[float, int]] = {}
    for b in range(n_bins):
        mask = idx == b
        if mask.any():
            out[b] = (float(per_sample.detach()[mask].sum()), int(mask.sum()))
    return out


def condition_dropout_mask(n: int, p_uncond: float, *, generator: torch.Generator | None = None,
                           device: torch.device | str | None = None) -> Tensor:
    """[n] bool, True where the condition is replaced by the null condition (probability p_uncond)."""
    if p_uncond <= 0.0:
        return torch.zeros(n, dtype=torch.bool, device=device)
    return torch.rand(n, generator=generator, device=device) < p_uncond


def cfg_mix(v_uncond: Tensor, v_cond: Tensor, scale: float) -> Tensor:
    """v = v_uncond + w (v_cond - v_uncond); w = 1 is the conditional prediction, w = 0 the unconditional."""
    return v_uncond + scale * (v_cond - v_uncond)


def sampling_times(steps: int, shift: float = 1.0) -> Tensor:
    """[steps + 1] times from 1 (noise) down to 0 (data): a uniform grid mapped through the shift."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x_t [B, ...], t [B]) -> v [B, ...]


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: Tensor, *, steps: int, shift: float = 1.0) -> Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 1 (x = noise) to t = 0 with Euler steps."""
    times = sampling_times(steps, shift).to(noise.device)
    x = noise
    for t_cur, t_next in zip(times[:-1], times[1:]):
        t_batch = torch.full((x.shape[0],), float(t_cur), device=x.device)
        x = x + (t_next - t_cur).to(x.dtype) * velocity(x, t_batch)
    return x


# ---------------------------------------------------------------------------
# VAE reconstruction
# ---------------------------------------------------------------------------

def truncate_sdf(sdf: Tensor, tau: float) -> Tensor:
    """clip(sdf, -tau, tau) / tau: the [-1, 1] regression target."""
    return sdf.clamp(-tau, tau) / tau


def sdf_regression_loss(pred: Tensor, sdf: Tensor, tau: float) -> dict[str, Tensor]:
    """MSE + L1 between the prediction (in truncated units) and the truncated SDF target."""
    target = truncate_sdf(sdf.float(), tau)
    diff = pred.float() - target
    mse, l1 = diff.pow(2).mean(), diff.abs().mean()
    return {"recon": mse + l1, "mse": mse, "l1": l1}


def occupancy_bce_loss(logits: Tensor, inside: Tensor) -> dict[str, Tensor]:
    """BCE against occupancy labels ``inside`` (bool, e.g. ``sdf < 0``); logits are positive inside."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), inside.float())
    return {"recon": bce, "bce": bce}


def kl_weight(step: int, weight: float = 1e-3, warmup_steps: int = 0) -> float:
    """KL weight ramped linearly from 0 to ``weight`` over ``warmup_steps`` (constant if 0)."""
    if warmup_steps <= 0:
        return weight
    return weight * min(1.0, step / warmup_steps)


def eikonal_loss(grad: Tensor, target_norm: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """mean((|grad| - target)^2) over grad [..., 3] (where ``mask`` [...] is true; 0 if none is).
    For a prediction in truncated units target = 1 / tau."""
    err = (grad.float().norm(dim=-1) - target_norm).pow(2)
    if mask is None:
        return err.mean()
    return (err * mask).sum() / mask.sum().clamp_min(1)


def eikonal_points(query: Tensor, sdf: Tensor, tau: float, count: int) -> tuple[Tensor, Tensor]:
    """Up to ``count`` queries per sample inside the truncation band |sdf| < tau, where the truncated
    target has gradient norm 1 / tau (beyond it the target is flat): query [B, Q, 3], sdf [B, Q] ->
    (points [B, P, 3], in-band mask [B, P]), P = min(count, Q). Band points are taken in query order
    (the loader's queries are random draws, so this is a random subset, and needs no RNG)."""
    in_band = sdf.abs() < tau                                                    # [B, Q]
    order = torch.arange(query.shape[1], 0, -1, device=query.device)            # earlier first
    key = in_band.long() * (query.shape[1] + 1) + order                          # band points first
    idx = key.topk(min(count, query.shape[1]), dim=1).indices                    # [B, P]
    points = torch.gather(query, 1, idx[..., None].expand(-1, -1, 3))
    return points, torch.gather(in_band, 1, idx)


def spatial_gradient(values: Tensor, points: Tensor) -> Tensor:
    """d values / d points [..., 3]; ``points`` must require grad and ``values`` depend on it."""
    (grad,) = torch.autograd.grad(values.sum(), points, create_graph=True)
    return grad


# ---------------------------------------------------------------------------
# Metrics (the zero level set is the surface)
# ---------------------------------------------------------------------------

def volume_iou(pred_sdf: Tensor, true_sdf: Tensor) -> Tensor:
    """[B] IoU of the inside sets {sdf < 0} over query points [B, P]; 1 when both are empty."""
    pred_in, true_in = pred_sdf < 0, true_sdf < 0
    inter = (pred_in & true_in).flatten(1).sum(1).float()
    union = (pred_in | true_in).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _nearest_distances(a: Tensor, b: Tensor, chunk: int = 4096) -> Tensor:
    """[Na] distance from each point of a [Na, 3] to its nearest neighbour in b [Nb, 3]."""
    exact = "donot_use_mm_for_euclid_dist"   # the matmul shortcut loses precision for near-equal points
    return torch.cat([torch.cdist(a[i:i + chunk], b, compute_mode=exact).min(dim=1).values
                      for i in range(0, len(a), chunk)])


def chamfer_and_fscore(pred_pts: Tensor, true_pts: Tensor, threshold: float = 0.01) -> dict[str, float]:
    """Symmetric Chamfer-L1 (mean of both directions) and F-score at ``threshold`` between point sets."""
    if len(pred_pts) == 0 or len(true_pts) == 0:
        return {"chamfer": math.inf, "fscore": 0.0, "precision": 0.0, "recall": 0.0}
    d_pred = _nearest_distances(pred_pts.float(), true_pts.float())
    d_true = _nearest_distances(true_pts.float(), pred_pts.float())
    precision = float((d_pred < threshold).float().mean())
    recall = float((d_true < threshold).float().mean())
    fscore = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    chamfer = 0.5 * float(d_pred.mean() + d_true.mean())
    return {"chamfer": chamfer, "fscore": fscore, "precision": precision, "recall": recall}
