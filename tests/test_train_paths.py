"""Training paths the end-to-end tests do not reach: bf16 autocast, gradient clipping, the non-finite
guard, the voxel VAE and voxel DiT presets, class-id conditioning with CFG dropout (real shards, CPU)."""
from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient
from train_fixtures import FAST, MESHES

import models
from trainer import checkpoint as ckpt
from trainer import commands as cli
from trainer import inference
from trainer import tasks as train_steps
from trainer.config import EngineConfig, load_train_config
from trainer.engines import create_engine
from trainer.loop import TrainingDiverged, train

pytestmark = pytest.mark.slow


def config(name: str, shards, run_dir, *extra: str):
    return load_train_config(name, [f"data.path={shards}", f"run.dir={run_dir}", *FAST, "run.eval_every=0",
                                    "run.log_every=1", *extra])


# ---------------------------------------------------------------------------
# bf16 autocast, gradient clipping
# ---------------------------------------------------------------------------

def test_bf16_autocast_trains_with_fp32_weights_and_close_losses(train_shards, tmp_path):
    common = ["run.max_steps=2", "ema.enabled=false"]
    fp32 = train(config("vecset_vae_debug", train_shards, tmp_path / "fp32", *common))["losses"]
    bf16 = train(config("vecset_vae_debug", train_shards, tmp_path / "bf16", *common, "precision=bf16"))["losses"]
    assert all(math.isfinite(v) for v in bf16.values())
    assert bf16[0] != fp32[0]                                # autocast really ran in bf16 ...
    assert bf16[0] == pytest.approx(fp32[0], rel=0.05)       # ... and computes the same loss to bf16 precision
    net, _, _ = inference.load_network(tmp_path / "bf16" / "checkpoints" / "step_00000002", use_ema=False)
    assert {p.dtype for p in net.parameters()} == {torch.float32}     # master weights stay fp32


def test_gradient_clipping_scales_the_update_and_reports_the_unclipped_norm():
    torch.manual_seed(0)
    engine = create_engine(EngineConfig(), "fp32")
    model = engine.prepare(torch.nn.Linear(4, 1), lambda params: torch.optim.SGD(params, lr=1.0),
                           lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))
    before = [p.detach().clone() for p in model.parameters()]
    engine.backward(model(torch.full((8, 4), 10.0)).pow(2).mean())
    full_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    norm, applied = engine.step(clip_norm=0.5)
    moved = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.parameters(), before)))
    assert applied and norm == pytest.approx(full_norm, rel=1e-5) and full_norm > 5
    assert moved == pytest.approx(0.5, rel=1e-4)           # SGD lr 1: the step is the clipped gradient


# ---------------------------------------------------------------------------
# the non-finite guard
# ---------------------------------------------------------------------------

def poison_loss(monkeypatch, bad_steps):
    """Make VaeTask.compute return a NaN loss (still attached to the graph) at ``bad_steps``."""
    original = train_steps.VaeTask.compute

    def compute(self, model, batch, rand, step):
        loss, metrics = original(self, model, batch, rand, step)
        if step in bad_steps:
            loss = loss * float("nan")
            metrics = {**metrics, "loss": float("nan")}
        return loss, metrics

    monkeypatch.setattr(train_steps.VaeTask, "compute", compute)


def test_a_non_finite_loss_skips_the_update_and_is_counted(train_shards, tmp_path, monkeypatch):
    poison_loss(monkeypatch, {2})
    run_dir = tmp_path / "run"
    summary = train(config("vecset_vae_debug", train_shards, run_dir, "run.max_steps=4", "run.ckpt_every=1",
                           "ema.enabled=false"))
    assert summary["step"] == 4 and summary["skipped_steps"] == 1
    assert math.isnan(summary["losses"][2]) and all(math.isfinite(summary["losses"][s]) for s in (0, 1, 3))
    weights = lambda step: inference.load_network(run_dir / "checkpoints" / f"step_{step:08d}",  # noqa: E731
                                             use_ema=False)[0].state_dict()
    before, after, later = weights(2), weights(3), weights(4)
    assert all(torch.equal(before[k], after[k]) for k in before)          # the poisoned step changed nothing
    assert any(not torch.equal(after[k], later[k]) for k in after)        # training went on afterwards
    run = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}").get_run(summary["mlflow_run_id"])
    assert run.data.metrics["skipped_steps"] == 1.0


def test_k_non_finite_steps_in_a_row_abort_with_a_clear_message(train_shards, tmp_path, monkeypatch, capsys):
    poison_loss(monkeypatch, set(range(1, 100)))
    with pytest.raises(TrainingDiverged, match=r"3 non-finite losses/gradients in a row .*run\.nan_guard"):
        train(config("vecset_vae_debug", train_shards, tmp_path / "run", "run.max_steps=10", "run.nan_guard=3"))
    # the command line turns it into exit code 3 and one line on stderr
    rc = cli.main(["train", "vecset_vae_debug", f"data.path={train_shards}", f"run.dir={tmp_path / 'cli'}", *FAST,
                   "run.eval_every=0", "run.max_steps=10", "run.nan_guard=2"])
    err = capsys.readouterr().err
    assert rc == 3 and "2 non-finite losses/gradients in a row" in err, err


# ---------------------------------------------------------------------------
# voxel presets
# ---------------------------------------------------------------------------

def mean_loss(losses: dict[int, float], steps: range) -> float:
    return sum(losses[s] for s in steps) / len(steps)


def test_voxel_vae_and_voxel_dit_debug_presets_train_and_sample(train_shards, tmp_path):
    # Steps cost ~0.1 s (VAE) / 0.05 s (DiT) of CPU here; set-up and evaluation dominate, so 30 + 40 steps
    # cost ~5 s more than 3 + 3 and are enough to tell learning from no learning. Measured (2026-12-02,
    # seeded, CPU): VAE loss 0.660 -> 0.325 (first 3 vs last 5 steps, ratio 0.49), eval IoU 0.52;
    # DiT loss ratio (first 10 vs last 10 steps) 0.85. With optim.lr=1e-9 (learns nothing): VAE ratio 1.00,
    # IoU 0.02; DiT ratio 1.00. An all-occupied 16^3 grid scores IoU <= 0.10 on these shapes.
    vae_dir = tmp_path / "voxel_vae"
    vae = train(config("voxel_vae_debug", train_shards, vae_dir, "run.max_steps=30", "run.eval_every=30"))
    assert vae["step"] == 30 and all(math.isfinite(v) for v in vae["losses"].values())
    vae_drop = mean_loss(vae["losses"], range(25, 30)) / mean_loss(vae["losses"], range(3))
    assert vae_drop < 0.7, f"voxel VAE loss fell only to {vae_drop:.2f} of its start (measured 0.49)"
    assert vae["eval"]["eval/iou"] > 0.3, f"voxel VAE reconstruction IoU {vae['eval']['eval/iou']:.3f} (measured 0.52)"
    vae_ckpt = vae_dir / "checkpoints" / "step_00000030"
    dit_dir = tmp_path / "voxel_dit"
    dit = train(config("voxel_dit_debug", train_shards, dit_dir, f"vae.checkpoint={vae_ckpt}", "data.options={}",
                       "run.max_steps=40", "run.eval_every=40"))
    assert all(math.isfinite(v) for v in dit["losses"].values())
    dit_drop = mean_loss(dit["losses"], range(30, 40)) / mean_loss(dit["losses"], range(10))
    assert dit_drop < 0.93, f"voxel DiT loss fell only to {dit_drop:.2f} of its start (measured 0.85)"
    assert dit["eval"]["eval/nonempty"] == 1.0                       # every sampled latent decodes to a surface
    derived = ckpt.read_meta(dit_dir / "checkpoints" / "step_00000040")["derived"]
    # 16^3 occupancy -> the debug voxel VAE's 8^3 x 4 latent grid, read through the loader's vae task
    assert derived["latent_shape"] == [4, 8, 8, 8]
    assert derived["model_overrides"]["in_channels"] == 4 and derived["model_overrides"]["resolution"] == 8
    assert (dit_dir / "eval" / "step_00000040" / "sample_00.png").exists()


# ---------------------------------------------------------------------------
# class-id conditioning with CFG dropout
# ---------------------------------------------------------------------------

def test_class_conditioned_dit_drops_the_class_for_cfg_and_samples_with_guidance(train_shards, tmp_path,
                                                                                monkeypatch):
    vae_dir = tmp_path / "vae"
    train(config("vecset_vae_debug", train_shards, vae_dir, "run.max_steps=1"))
    vae_ckpt = vae_dir / "checkpoints" / "step_00000001"

    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []   # (class ids, drop mask, ids the net got)
    objective_forward, dit_forward = train_steps.DitObjective.forward, models.VecSetDiT.forward
    given: dict[str, torch.Tensor] = {}

    def spy_objective(self, x0, eps, t, cond, drop):
        given.update(cond=cond.clone(), drop=drop.clone())
        return objective_forward(self, x0, eps, t, cond, drop)

    def spy_dit(self, x, t, cond=None):
        if self.training and given:
            seen.append((given.pop("cond"), given.pop("drop"), cond.clone()))
        return dit_forward(self, x, t, cond)

    monkeypatch.setattr(train_steps.DitObjective, "forward", spy_objective)
    monkeypatch.setattr(models.VecSetDiT, "forward", spy_dit)
    # the class is the source mesh's name (json "source"): four shapes, four classes
    names = "[" + ", ".join(MESHES) + "]"
    run_dir = tmp_path / "dit"
    train(config("vecset_dit_debug", train_shards, run_dir, f"vae.checkpoint={vae_ckpt}",
                 f"data.options={{condition: class, class_key: source, class_names: {names}}}",
                 "data.batch_size=4", "condition.kind=class", "condition.num_classes=4", "condition.p_uncond=0.5",
                 "eval.guidance=3.0", "run.max_steps=4", "run.eval_every=4"))
    assert len(seen) == 4
    ids = torch.cat([c for c, _, _ in seen])
    drops = torch.cat([d for _, d, _ in seen])
    got = torch.cat([g for _, _, g in seen])
    assert sorted(set(ids.tolist())) == [0, 1, 2, 3]
    assert torch.equal(got, torch.where(drops, torch.full_like(ids, 4), ids))   # dropped rows get the null class 4
    assert 0 < int(drops.sum()) < len(drops)                                      # p_uncond 0.5 over 16 draws
    derived = ckpt.read_meta(run_dir / "checkpoints" / "step_00000004")["derived"]
    assert derived["model_overrides"]["condition"] == "class" and derived["model_overrides"]["num_classes"] == 4
    assert (run_dir / "eval" / "step_00000004" / "sample_00.png").exists()       # guided sampling in evaluation

    out = tmp_path / "samples"
    args = ["sample", str(run_dir / "checkpoints" / "step_00000004"), "--out", str(out), "--num", "1",
            "--steps", "2", "--resolution", "16", "--format", "obj"]
    assert cli.main(args) == 2                                  # a class-conditioned DiT needs --class-id
    assert cli.main([*args, "--class-id", "1", "--guidance", "2.0"]) == 0
