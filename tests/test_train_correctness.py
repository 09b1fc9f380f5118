"""Training correctness (issue 11): time sampling of every bundled config, EMA warm-up, loader counts
derived from the model, eikonal band, voxel noise shape, strategy availability. CPU, seconds."""
from __future__ import annotations

import sys

import pytest
import torch

from data_pipeline.typed_config import load_config
from trainer import objectives as obj
from trainer.config import CONFIG_DIR, TrainConfig
from trainer.ema import EMA

BUNDLED = sorted(CONFIG_DIR.glob("*.yaml"))
DIT_CONFIGS = [p for p in BUNDLED if load_config(TrainConfig, p).task == "dit"]

# (mean, std, fraction above 0.9) of t per bundled DiT config, t = 1 noise. vecset_dit_base is
# PartPacker's: shift3(1 - sigmoid(N(1, 1))) (its sigma table runs from 1 down to 0).
T_MOMENTS = {
    "vecset_dit_base": (0.520, 0.208, 0.018),
    "voxel_dit_base": (0.697, 0.183, 0.116),   # TRELLIS: logit-normal(1, 1), no shift
    "vecset_dit_debug": (0.500, 0.208, 0.014),
    "voxel_dit_debug": (0.500, 0.208, 0.014),
}


def bundled_t(path, n=400_000):
    fl = load_config(TrainConfig, path).flow_loss
    return obj.sample_logit_normal_t(n, m=fl.t_mean, s=fl.t_std, shift=fl.t_shift,
                                     generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("path", DIT_CONFIGS, ids=lambda p: p.stem)
def test_every_bundled_dit_config_has_pinned_t_moments(path):
    t = bundled_t(path)
    mean, std, above = T_MOMENTS[path.stem]
    assert float(t.mean()) == pytest.approx(mean, abs=0.003)
    assert float(t.std()) == pytest.approx(std, abs=0.003)
    assert float((t > 0.9).float().mean()) == pytest.approx(above, abs=0.003)


def test_vecset_dit_base_reproduces_partpacker_time_sampling():
    """PartPacker draws u = sigmoid(N(1, 1)) and indexes a 1 -> 0 sigma table: its t is shift3(1 - u)."""
    u = torch.sigmoid(torch.randn(400_000, generator=torch.Generator().manual_seed(1)) + 1.0)
    reference = obj.shift_time(1.0 - u, 3.0)
    ours = bundled_t(CONFIG_DIR / "vecset_dit_base.yaml")
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert float(ours.quantile(q)) == pytest.approx(float(reference.quantile(q)), abs=0.004)


# ---------------------------------------------------------------------------
# EMA warm-up
# ---------------------------------------------------------------------------

def initial_weight_share(decay: float, steps: int) -> float:
    """Share of the initial weights left in the EMA after ``steps`` updates towards a zero parameter."""
    p = torch.nn.Parameter(torch.ones(1))
    ema = EMA([("p", p)], decay)
    with torch.no_grad():
        p.zero_()
    for n in range(1, steps + 1):
        ema.update(n)
    return float(ema.shadow[0])


def test_ema_warm_up_uses_min_decay_one_plus_n_over_ten_plus_n():
    p = torch.nn.Parameter(torch.zeros(1))
    ema = EMA([("p", p)], 0.9999)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update(1)                                  # decay 2/11: the EMA moves 9/11 of the way
    assert float(ema.shadow[0]) == pytest.approx(9 / 11)
    assert ema.decay_at(10**6) == 0.9999           # the configured decay caps the warm-up
    assert ema.decay_at(5) == pytest.approx(6 / 15)


def test_ema_forgets_the_initial_weights_early():
    # without warm-up 0.9999 ** 5000 = 0.61 of the random init would remain at step 5,000
    assert initial_weight_share(0.9999, 5000) < 1e-6


# ---------------------------------------------------------------------------
# engine.strategy=deepspeed without DeepSpeed
# ---------------------------------------------------------------------------

def test_deepspeed_strategy_without_deepspeed_fails_in_one_line(monkeypatch, tmp_path, capsys):
    from trainer import commands as cli
    monkeypatch.setitem(sys.modules, "deepspeed", None)   # find_spec / import now see no DeepSpeed
    rc = cli.main(["train", "vecset_vae_debug", f"data.path={tmp_path}", f"run.dir={tmp_path / 'run'}",
                   "engine.strategy=deepspeed"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert 'pip install -e ".[deepspeed]"' in err[0]
    assert not (tmp_path / "run").exists()                # nothing started


# ---------------------------------------------------------------------------
# eikonal band, voxel noise (real networks on small hand-made batches)
# ---------------------------------------------------------------------------

def vae_task(*overrides):
    from trainer.config import load_train_config
    from trainer.tasks import VaeTask
    return VaeTask(load_train_config("vecset_vae_debug", ["data.path=unused", *overrides]))


def vecset_batch(sdf: torch.Tensor, gen: torch.Generator) -> dict:
    b, q = sdf.shape
    normal = torch.nn.functional.normalize(torch.randn(b, 64, 3, generator=gen), dim=-1)
    return {"surface": torch.rand(b, 64, 3, generator=gen) * 2 - 1, "surface_normal": normal,
            "query": torch.rand(b, q, 3, generator=gen) * 2 - 1, "sdf": sdf}


def eikonal_term(task, sdf: torch.Tensor) -> float:
    from trainer.tasks import BatchRandom
    gen = torch.Generator().manual_seed(0)
    batch = vecset_batch(sdf, gen)
    rand = BatchRandom(0, 0, 0, 0, 1, sdf.shape[0], torch.device("cpu"))
    _, metrics = task.compute(task.objective, batch, rand, 0)
    return metrics["eikonal"]


def test_eikonal_points_are_inside_the_truncation_band():
    sdf = torch.tensor([[0.5, 0.01, -0.02, 0.3, 0.04], [0.2, 0.2, 0.2, 0.2, -0.01]])
    query = torch.arange(5.0).reshape(1, 5, 1).expand(2, 5, 3).contiguous()
    pts, mask = obj.eikonal_points(query, sdf, tau=0.05, count=2)
    assert pts[0, :, 0].tolist() == [1.0, 2.0] and mask[0].all()
    assert pts[1, 0, 0] == 4.0 and mask[1].tolist() == [True, False]   # one band point, one masked


def test_eikonal_term_ignores_queries_beyond_the_truncation():
    task = vae_task("vae_loss.eikonal_weight=0.1", "vae_loss.tau=0.1")
    far = torch.full((2, 300), 0.5)                 # every query beyond tau: the target is flat there
    assert eikonal_term(task, far) == 0.0
    near = far.clone()
    near[:, :100] = 0.01                            # band points (not the last 256) are used
    assert eikonal_term(task, near) > 0.0


def test_voxel_vae_trains_on_a_non_cubic_grid():
    from trainer.tasks import BatchRandom
    task = vae_task("model.name=voxel_vae/debug", "vae_loss.kind=occupancy")
    occ = (torch.rand(2, 1, 16, 8, 24, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    loss, metrics = task.compute(task.objective, {"occ": occ}, BatchRandom(0, 0, 0, 0, 1, 2, torch.device("cpu")), 0)
    loss.backward()
    assert torch.isfinite(loss) and 0.0 <= metrics["iou"] <= 1.0


# ---------------------------------------------------------------------------
# loader counts derived from the model
# ---------------------------------------------------------------------------

VAE_CONFIGS = [p for p in BUNDLED if load_config(TrainConfig, p).task == "vae"]


def fed_token_types(options: dict, task: str, net) -> None:
    """Every token type the VAE declares gets at least as many points as tokens, and the loader reads them."""
    from data_pipeline.loading.batches import parse_task_options, required_keys
    parsed = parse_task_options(task, options)
    mc = net.config
    if hasattr(mc, "num_sharp_latents"):
        assert parsed.num_surface >= mc.num_latents
        assert parsed.num_sharp >= mc.num_sharp_latents
        assert ("sharp.npy" in required_keys(task, parsed)) == (mc.num_sharp_latents > 0)
    else:
        assert parsed.occupancy


@pytest.mark.parametrize("path", VAE_CONFIGS, ids=lambda p: p.stem)
def test_every_bundled_vae_config_feeds_every_token_type(path):
    from trainer.config import load_train_config
    from trainer.tasks import VaeTask
    task = VaeTask(load_train_config(path, ["data.path=unused"]))
    fed_token_types(task.loader_options(), "vae", task.net)


@pytest.mark.parametrize("path", DIT_CONFIGS, ids=lambda p: p.stem)
def test_every_bundled_dit_config_feeds_its_vae_every_token_type(path):
    """A DiT config on the same-size VAE config (as the docs pair them) encodes with every token type."""
    from trainer.config import load_train_config
    from trainer.tasks import VaeTask, dit_surface_options
    vae_cfg = load_train_config(path.stem.replace("_dit_", "_vae_"), ["data.path=unused"])
    vae = VaeTask(vae_cfg).net
    if hasattr(vae.config, "num_sharp_latents"):
        fed_token_types(dit_surface_options(vae_cfg, vae), "dit", vae)


def test_loader_counts_that_starve_a_token_type_fail_before_training():
    from data_pipeline.typed_config import ConfigError
    with pytest.raises(ConfigError, match="num_sharp.*num_sharp_latents"):
        vae_task("data.options={num_sharp: 0}").loader_options()
    assert vae_task("data.options={num_sharp: 0}",
                    "model.overrides={num_sharp_latents: 0}").loader_options()["num_sharp"] == 0


# ---------------------------------------------------------------------------
# progress in a log file
# ---------------------------------------------------------------------------

def test_progress_without_a_terminal_prints_plain_lines_only_when_logging():
    import io
    import re

    from trainer.config import load_train_config
    from trainer.loop import Progress
    log = io.StringIO()                                   # not a tty, like a SLURM job log
    progress = Progress(load_train_config("vecset_vae_debug", ["data.path=unused"]), 0, True, log)
    for step in range(1, 21):
        progress.update()
        if step % 10 == 0:
            progress.log(step, {"loss": 0.5 / step, "lr": 1e-3, "samples_per_s": 40.0, "data_wait": 0.125})
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2
    assert re.fullmatch(r"step 20/300 loss 0\.025 lr 1\.00e-03 samples/s 40\.0 data wait 12% ETA \d+:\d\d:\d\d", lines[1])


# ---------------------------------------------------------------------------
# latent scale factor measured on what training feeds the DiT
# ---------------------------------------------------------------------------

def test_scale_factor_latents_are_posterior_samples_for_latents_sample():
    from models.layers import init_posterior_head
    from trainer.config import load_train_config
    from trainer.tasks import DitTask
    cfg = load_train_config("vecset_dit_debug", ["data.path=unused", "vae.latents=cached"])
    cfg.vae.latents = "sample"                               # a VAE network is attached below instead
    task = DitTask(cfg, torch.device("cpu"))
    vae = vae_task()
    task.vae, task.vae_cfg = vae.net.eval(), vae.cfg
    init_posterior_head(task.vae.encoder.to_moments, logvar=2.0)   # posterior std e: noise dominates
    gen = torch.Generator().manual_seed(0)
    batches = [{**vecset_batch(torch.zeros(2, 1), gen), "id": ["a", "b"]} for _ in range(2)]
    measured = task.measured_latents(batches, 0, 1)
    mode = torch.cat([task.latents(b, None) for b in batches])
    expected = (mode.var() + torch.e ** 2) ** 0.5             # std of mode + e * N(0, 1)
    assert float(measured.std()) == pytest.approx(float(expected), rel=0.1)
    assert float(mode.std()) < 0.5 * float(measured.std())


# ---------------------------------------------------------------------------
# data wait: how long the step waited for the loader
# ---------------------------------------------------------------------------

def test_data_wait_is_the_time_optimizer_step_spends_waiting_for_batches():
    import time
    import types

    from trainer.config import load_train_config
    from trainer.engines import create_engine
    from trainer.loop import Trainer, make_optimizer, make_scheduler
    from trainer.preemption import StopRequest
    from trainer.tasks import make_task
    cfg = load_train_config("voxel_vae_debug", ["data.path=unused", "vae_loss.kind=occupancy", "optim.grad_accum=2"])
    engine = create_engine(cfg.engine, cfg.precision, cfg.optim)
    task = make_task(cfg, engine.device)
    model = engine.prepare(task.objective, lambda p: make_optimizer(p, cfg.optim),
                           lambda o: make_scheduler(o, cfg.optim, cfg.run.max_steps))
    state = types.SimpleNamespace(cfg=cfg, engine=engine, task=task, model=model, step=0, stop=StopRequest(),
                                  stop_agreed=False)
    batch = {"occ": (torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float(),
             "id": ["a", "b"]}

    def slow_loader(delay: float):
        while True:
            time.sleep(delay)
            yield batch

    fast, _ = Trainer.optimizer_step(state, slow_loader(0.0))
    slow, _ = Trainer.optimizer_step(state, slow_loader(0.25))
    assert fast["data_wait_s"] < 0.05 and fast["step_s"] > fast["data_wait_s"]
    assert 0.5 <= slow["data_wait_s"] < slow["step_s"]         # two micro-batches, 0.25 s each
