"""Checkpoints: atomic layout, rotation, latest pointer, resume=auto ignores incomplete directories."""
import json
import random

import numpy as np
import pytest
import torch

import models
from trainer import checkpoint as ckpt
from trainer.config import EngineConfig, TrainConfig
from trainer.engines.ddp import DDPEngine


def make_engine():
    engine = DDPEngine(EngineConfig())
    torch.manual_seed(0)
    model = models.build("vecset_dit/debug", condition="none")
    engine.prepare(model, lambda p: torch.optim.AdamW(p, lr=1e-3),
                   lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0))
    return engine, engine.make_ema(0.9)


def train_one_step(engine, ema):
    x = torch.randn(2, 4, 8)
    loss = engine.model(x, torch.rand(2)).square().mean() + sum(p.square().sum() for p in engine.module.parameters())
    engine.backward(loss)
    engine.step(1.0)
    ema.update()


def save(engine, ema, root, step, metric=None, keep_last=2, loader_state=None):
    return ckpt.save_checkpoint(engine, root, step, ema=ema, loader_state=loader_state or {"cursor": step},
                                config=TrainConfig(), meta_extra={"mlflow_run_id": "abc"}, metric=metric,
                                keep_last=keep_last)


def test_save_writes_complete_checkpoint_and_latest_pointer(tmp_path):
    engine, ema = make_engine()
    train_one_step(engine, ema)
    path = save(engine, ema, tmp_path, 7)
    assert path.name == "step_00000007"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["complete"] and meta["step"] == 7 and meta["mlflow_run_id"] == "abc"
    for name in ("model.pt", "optimizer.pt", "scheduler.pt", "ema.pt", "rank_00000.pt", "config.yaml"):
        assert (path / name).exists(), name
    assert (tmp_path / "latest").read_text() == "step_00000007"
    assert not list(tmp_path.glob(".tmp-*"))


def test_rotation_keeps_last_k_and_best(tmp_path):
    engine, ema = make_engine()
    for step, metric in [(1, 5.0), (2, 0.5), (3, 4.0), (4, 3.0), (5, 2.0)]:
        save(engine, ema, tmp_path, step, metric=metric, keep_last=2)
    kept = sorted(p.name for p in ckpt.complete_checkpoints(tmp_path))
    assert kept == ["step_00000002", "step_00000004", "step_00000005"]  # best (0.5) + last two


def test_resume_auto_ignores_half_written_and_temporary_directories(tmp_path):
    engine, ema = make_engine()
    save(engine, ema, tmp_path, 10)
    # a crash while writing step 20: files but no meta.json
    half = tmp_path / "step_00000020"
    half.mkdir()
    torch.save(engine.module.state_dict(), half / "model.pt")
    # a meta.json that lists a file that never arrived
    broken = tmp_path / "step_00000030"
    broken.mkdir()
    (broken / "meta.json").write_text(json.dumps({"complete": True, "step": 30, "files": ["model.pt"]}))
    (tmp_path / ".tmp-step_00000040").mkdir()
    (tmp_path / "latest").write_text("step_00000030")  # pointer to a broken checkpoint
    assert ckpt.resolve_resume(tmp_path, "auto").name == "step_00000010"
    assert ckpt.resolve_resume(tmp_path, "never") is None
    assert ckpt.resolve_resume(tmp_path / "nothing-here", "auto") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, str(half))


def test_load_restores_weights_optimizer_ema_rng_and_loader(tmp_path):
    engine, ema = make_engine()
    train_one_step(engine, ema)
    torch.manual_seed(123)
    np.random.seed(4)
    random.seed(5)
    path = save(engine, ema, tmp_path, 1, loader_state={"epoch": 3, "offset": 17})
    expected_draws = (torch.rand(3), np.random.rand(2), random.random())
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    ema_state = ema.state_dict()
    opt_state = engine.optimizer.state_dict()["state"]

    other, other_ema = make_engine()  # different weights (no training step), fresh optimiser
    meta, loader_state = ckpt.load_checkpoint(other, path, ema=other_ema)
    assert meta["step"] == 1 and loader_state == {"epoch": 3, "offset": 17}
    for k, v in other.module.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for k, v in other_ema.state_dict().items():
        assert torch.equal(v, ema_state[k]), k
    restored = other.optimizer.state_dict()["state"]
    assert torch.equal(restored[0]["exp_avg"], opt_state[0]["exp_avg"])
    draws = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(draws[0], expected_draws[0]) and np.array_equal(draws[1], expected_draws[1])
    assert draws[2] == expected_draws[2]


def test_a_run_or_checkpoints_directory_means_its_latest_complete_checkpoint(tmp_path, capsys):
    from trainer.config import ModelConfig
    from trainer.inference import load_network
    from trainer.tasks import DitObjective
    engine = DDPEngine(EngineConfig())
    net = models.build("vecset_dit/debug", condition="none")
    engine.prepare(DitObjective(net), lambda p: torch.optim.AdamW(p, lr=1e-3),
                   lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0))
    cfg = TrainConfig(task="dit", model=ModelConfig(name="vecset_dit/debug", overrides={"condition": "none"}))
    run = tmp_path / "run"
    for step in (1, 2):
        ckpt.save_checkpoint(engine, run / "checkpoints", step, ema=None, loader_state={}, config=cfg,
                             meta_extra={}, metric=None, keep_last=3)
    (run / "checkpoints" / "step_00000003").mkdir()          # incomplete: ignored
    step2 = run / "checkpoints" / "step_00000002"
    for given in (run, run / "checkpoints", step2):
        assert ckpt.resolve_checkpoint(given) == step2
    assert ckpt.resolve_checkpoint(run / "checkpoints" / "step_00000001").name == "step_00000001"
    err = capsys.readouterr().err
    assert err.count(f"using {step2}") == 2                   # said for the run and checkpoints/ forms only
    loaded, loaded_cfg, meta = load_network(run)
    assert isinstance(loaded, models.VecSetDiT)
    assert meta["step"] == 2 and loaded_cfg.model.name == "vecset_dit/debug"
    assert ckpt.resolve_resume(run / "checkpoints", str(run)) == step2
    with pytest.raises(FileNotFoundError, match="run directory"):
        ckpt.resolve_checkpoint(tmp_path / "empty")


@pytest.mark.parametrize("use_ema", [True, False])
def test_the_dit_run_vae_follows_vae_use_ema(tmp_path, use_ema):
    """`shapeflow sample` and DiT training load the VAE through load_run_vae: vae.use_ema decides."""
    from trainer.config import ModelConfig, VaeSourceConfig
    from trainer.inference import load_run_vae
    from trainer.tasks import VaeObjective
    vae_cfg = TrainConfig(task="vae", model=ModelConfig(name="vecset_vae/debug"))
    engine = DDPEngine(EngineConfig())
    net = models.build("vecset_vae/debug")
    engine.prepare(VaeObjective(net, vae_cfg), lambda p: torch.optim.AdamW(p, lr=1e-3),
                   lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0))
    ema = engine.make_ema(0.9)
    with torch.no_grad():                                   # the raw weights move, the EMA does not
        for p in net.parameters():
            p.add_(1.0)
    path = ckpt.save_checkpoint(engine, tmp_path / "checkpoints", 1, ema=ema, loader_state={}, config=vae_cfg,
                                meta_extra={}, metric=None, keep_last=1)
    dit_cfg = TrainConfig(task="dit", vae=VaeSourceConfig(checkpoint=str(path), use_ema=use_ema))
    vae, _ = load_run_vae(dit_cfg, torch.device("cpu"))
    expected = ema.state_dict() if use_ema else {f"net.{k}": v for k, v in net.state_dict().items()}
    name = "encoder.to_moments.weight"
    assert torch.equal(vae.state_dict()[name], expected[f"net.{name}"].float())
