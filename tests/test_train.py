"""`shapeflow train` end to end on real shards (debug presets, CPU): config errors, checkpoints,
MLflow read-back, exact resume after a kill, DiT on a frozen VAE."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trimesh
from mlflow.tracking import MlflowClient
from train_fixtures import FAST, REPO

from trainer import checkpoint as ckpt
from trainer import commands as cli
from trainer.config import load_train_config
from trainer.loop import train

EVAL_IOU_MIN = 0.45   # quality_vae measured 0.56 (per shape 0.53-0.58); untrained or 2-step VAE 0.27-0.28

pytestmark = pytest.mark.slow


def vae_config(shards: Path, run_dir: Path, *extra: str):
    return load_train_config("vecset_vae_debug", [f"data.path={shards}", f"run.dir={run_dir}", *FAST, *extra])


# ---------------------------------------------------------------------------
# config errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("optim.lr=fast", "optim.lr"),
    ("engine.strategy=megatron", "engine.strategy"),
    ("engine.zero_stage=3", "engine.zero_stage"),      # only with engine.strategy=deepspeed
    ("engine.offload=optimizer", "engine.offload"),
    ("run.resume=/no/such/checkpoint", "run.resume"),
    ("condition.p_uncond=1.5", "condition.p_uncond"),
])
def test_bad_config_fails_before_training_naming_the_key(tmp_path, capsys, override, key):
    run_dir = tmp_path / "run"
    rc = cli.main(["train", "vecset_vae_debug", f"data.path={tmp_path}", f"run.dir={run_dir}", override])
    err = capsys.readouterr().err
    assert rc == 2 and key in err, err
    assert not run_dir.exists()  # nothing started


def test_missing_data_path_and_vae_checkpoint_are_named(tmp_path, capsys):
    assert cli.main(["train", "vecset_vae_debug"]) == 2
    assert "data.path" in capsys.readouterr().err
    assert cli.main(["train", "vecset_dit_debug", f"data.path={tmp_path}"]) == 2
    assert "vae.checkpoint" in capsys.readouterr().err
    assert cli.main(["train", "no_such_config"]) == 2
    assert "vecset_vae_debug" in capsys.readouterr().err  # lists the bundled configs


def test_unknown_model_override_fails_before_training(train_shards, tmp_path):
    from data_pipeline.typed_config import ConfigError
    with pytest.raises(ConfigError, match="model"):
        train(vae_config(train_shards, tmp_path / "run", "model.overrides={widthh: 3}"))


# ---------------------------------------------------------------------------
# a run: checkpoints + MLflow
# ---------------------------------------------------------------------------

def test_vae_run_writes_checkpoints_and_an_mlflow_run(train_shards, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "train-test")
    run_dir = tmp_path / "run"
    cfg = vae_config(train_shards, run_dir, "run.max_steps=6", "run.ckpt_every=2", "run.keep_last=2",
                     "run.log_every=2", "run.eval_every=3")
    summary = train(cfg)
    assert summary["step"] == 6 and summary["skipped_steps"] == 0
    assert (run_dir / "config.yaml").exists()
    kept = [p.name for p in ckpt.complete_checkpoints(run_dir / "checkpoints")]
    assert "step_00000006" in kept and len(kept) <= 3  # last two + best
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "train-test"
    assert run.data.params["optim.lr"] == str(cfg.optim.lr) and run.data.params["task"] == "vae"
    assert run.data.params["model.name"] == "vecset_vae/debug"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6]
    for key in ("lr", "samples_per_s", "data_wait", "grad_norm", "kl", "iou", "eval/iou", "eval/iou_vol",
                "eval/chamfer", "eval/fscore"):
        assert key in run.data.metrics, key
    assert 0.0 <= run.data.metrics["data_wait"] <= 1.0 and "data_wait_s" not in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots", "eval"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/loss_curve.png"]
    evals = [a.path for a in client.list_artifacts(run.info.run_id, "eval")]
    assert "eval/step_00000003" in evals and "eval/step_00000006" in evals
    files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "eval/step_00000006")}
    assert "recon_00.png" in files


# ---------------------------------------------------------------------------
# exact resume after a kill
# ---------------------------------------------------------------------------

def test_resume_after_kill_gives_the_same_losses(train_shards, tmp_path):
    common = ["run.max_steps=6", "run.ckpt_every=2", "run.log_every=1", "run.eval_every=0",
              "eval.num_samples=1", "ema.decay=0.9", "optim.grad_accum=2"]
    reference = train(vae_config(train_shards, tmp_path / "ref", *common))["losses"]

    run_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "trainer.commands", "train", "vecset_vae_debug", f"data.path={train_shards}",
            f"run.dir={run_dir}", *FAST, *common]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    resumed_from = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert resumed_from is not None, proc.stderr.read().decode()[-2000:]
    start = ckpt.read_meta(resumed_from)["step"]
    assert start < 6, "the process finished before it could be killed"

    # a crash while writing a later checkpoint leaves a half-written directory: resume=auto must skip it
    half = run_dir / "checkpoints" / "step_00000099"
    half.mkdir()
    (half / "model.pt").write_bytes(b"truncated")

    summary = train(vae_config(train_shards, run_dir, *common, "run.resume=auto"))
    assert sorted(summary["losses"]) == list(range(start, 6))
    for step, loss in summary["losses"].items():
        assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-7), step
    meta = ckpt.read_meta(run_dir / "checkpoints" / "step_00000006")
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    assert len(client.search_runs([r.experiment_id for r in client.search_experiments()])) == 1
    assert meta["mlflow_run_id"] == summary["mlflow_run_id"]


# ---------------------------------------------------------------------------
# DiT on a frozen VAE
# ---------------------------------------------------------------------------

def test_dit_trains_on_latents_of_a_frozen_vae_and_samples_meshes(train_shards, quality_vae, tmp_path):  # noqa: F811
    vae_ckpt = quality_vae["checkpoint"]   # a VAE that reconstructs: its decoder turns latents into shapes
    run_dir = tmp_path / "dit"
    cfg = load_train_config("vecset_dit_debug", [
        f"data.path={train_shards}", f"run.dir={run_dir}", f"vae.checkpoint={vae_ckpt}", *FAST,
        "data.options={}", "run.max_steps=3", "run.log_every=1", "vae.latents=sample", "flow_loss.t_bins=2"])
    summary = train(cfg)
    meta = ckpt.read_meta(run_dir / "checkpoints" / "step_00000003")
    assert meta["derived"]["model_overrides"]["in_channels"] == 8
    assert meta["derived"]["scale_factor"] > 0
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    metrics = client.get_run(summary["mlflow_run_id"]).data.metrics
    assert "loss" in metrics and ("loss_t0" in metrics or "loss_t1" in metrics)
    assert (run_dir / "eval" / "step_00000003" / "sample_00.png").exists()

    # `shapeflow sample` (EMA weights, Euler + decode + marching cubes) and `shapeflow eval` on these checkpoints
    out = tmp_path / "samples"
    rc = cli.main(["sample", str(run_dir / "checkpoints" / "step_00000003"), "--out", str(out), "--num", "2",
                   "--steps", "3", "--resolution", "16", "--format", "obj", "--preview"])
    assert rc == 0
    listing = json.loads((out / "samples.json").read_text())
    assert len([f for f in listing["files"] if f.endswith(".png")]) == 2
    objs = [Path(f) for f in listing["files"] if f.endswith(".obj")]
    # every sample is a mesh (measured: 2 of 2 non-empty); an empty level set means a broken decode path
    assert listing["empty"] == 0 and len(objs) == 2, listing
    assert all(len(trimesh.load(f, force="mesh").faces) > 0 for f in objs), listing

    # `shapeflow eval` on a VAE that learned (train_fixtures.quality_vae): an untrained or 2-step VAE
    # scores IoU 0.27-0.28 here, the trained one 0.56 (2026-12-02)
    metrics_file = tmp_path / "eval.json"
    rc = cli.main(["eval", str(vae_ckpt), "--data", str(train_shards), "--out", str(metrics_file),
                   "--resolution", "16", "--max-samples", "3", "--batch-size", "2", "--surface-points", "512"])
    assert rc == 0
    report = json.loads(metrics_file.read_text())
    assert report["samples"] == 3 and report["mean"]["iou"] > EVAL_IOU_MIN, report["mean"]
    assert {"id", "iou", "chamfer", "fscore"} <= set(report["per_sample"][0])
    assert cli.main(["sample", str(vae_ckpt), "--out", str(out)]) == 2  # a VAE is not a DiT
