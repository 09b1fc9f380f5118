"""The VecSet DiT debug preset overfits a handful of latents: Euler sampling from fresh noise lands near
one of the training latents (latents of a frozen VAE on the real fixture shards, `vae.latents=mode`).

Distances are between latent *sets*: the VecSet DiT has no positional embedding (PartPacker) and the
VAE decoder is permutation invariant, so a sample that is a permutation of a training latent is that
shape. We match tokens (Hungarian assignment) before taking the L2 distance, in the DiT's scaled units.
The frozen VAE uses 8 latent tokens (a set DiT must learn the token assignment, which takes a tiny
model many more steps for 32 tokens than a CPU test can afford).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from data_pipeline.loading.loader import make_loader
from trainer import checkpoint as ckpt
from trainer.config import load_train_config
from trainer.inference import guided_euler, load_frozen_vae, load_network
from trainer.loop import train

pytestmark = pytest.mark.slow


def set_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """L2 distance between token sets a, b [N, C] under the best one-to-one token matching."""
    cost = torch.cdist(a.double(), b.double()).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].sum()) ** 0.5


def nearest(samples: torch.Tensor, references: torch.Tensor) -> np.ndarray:
    return np.array([min(set_distance(s, r) for r in references) for s in samples])


def test_dit_debug_preset_overfits_four_latents_and_sampling_reproduces_them(train_shards, tmp_path,
                                                                           one_torch_thread):  # noqa: F811
    vae_dir = tmp_path / "vae"
    train(load_train_config("vecset_vae_debug", [
        f"data.path={train_shards}", f"run.dir={vae_dir}", "run.max_steps=2", "run.eval_every=0",
        "run.progress=false", "data.batch_size=2", "data.options={num_surface: 256, num_vol: 64, num_near: 64}",
        "model.overrides={num_latents: 8, num_sharp_latents: 0}"]))
    vae_ckpt = vae_dir / "checkpoints" / "step_00000002"
    dit_dir = tmp_path / "dit"
    summary = train(load_train_config("vecset_dit_debug", [
        f"data.path={train_shards}", f"run.dir={dit_dir}", f"vae.checkpoint={vae_ckpt}",
        "data.batch_size=16", "optim.lr=3e-3", "run.max_steps=800", "run.log_every=100", "run.ckpt_every=800",
        "run.eval_every=0", "ema.decay=0.9", "eval.grid_resolution=16", "eval.num_samples=1",
        "eval.sample_steps=4", "run.progress=false"]))
    losses = [summary["losses"][s] for s in sorted(summary["losses"])]
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:10])

    # the four training latents, scaled as the DiT sees them
    final = dit_dir / "checkpoints" / "step_00000800"
    derived = ckpt.read_meta(final)["derived"]
    vae, _ = load_frozen_vae(vae_ckpt, use_ema=True, device=torch.device("cpu"))
    loader = make_loader(train_shards, task="dit", batch_size=4, mode="eval", seed=0, rank=0, world_size=1,
                         num_surface=256)
    batch = next(iter(loader))
    with torch.no_grad():
        train_latents = vae.encode(batch["surface"], batch["surface_normal"]).mode() * derived["scale_factor"]

    net, cfg, _ = load_network(final, use_ema=True)
    noise = torch.randn(8, *derived["latent_shape"], generator=torch.Generator().manual_seed(123))
    sampled = guided_euler(net.eval(), noise, None, steps=10, shift=cfg.flow_loss.t_shift, guidance=1.0)

    to_sample = nearest(sampled, train_latents)
    from_noise = nearest(noise, train_latents)
    pairwise = min(set_distance(a, b) for i, a in enumerate(train_latents) for b in train_latents[i + 1:])
    report = (f"sample -> nearest training latent {np.round(to_sample, 2)}, noise -> nearest {from_noise.mean():.2f}, "
              f"closest pair of training latents {pairwise:.2f}")
    print(report)
    assert to_sample.mean() < 0.4 * from_noise.mean(), report    # far closer than where sampling started
    assert to_sample.max() < 0.75 * pairwise, report            # every sample is attributable to one latent
