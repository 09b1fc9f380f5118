"""`shapeflow demo --fast` end to end as a user runs it (a subprocess): 4 bundled meshes -> shards with condition
views -> VAE -> image-conditioned DiT (tiny random DINOv2) -> one mesh per held-out view -> eval JSON, both
training runs in one MLflow experiment.

This is also issue 9's learning test: the DiT, trained on views 0-4 of 4 shapes, must map the held-out view 5
of each shape to a mesh nearer (Chamfer) to that shape than to the 3 others for at least 3 of the 4."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from train_fixtures import REPO

pytestmark = pytest.mark.slow


def test_demo_fast_learns_image_to_shape_and_logs_into_one_mlflow_experiment(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "trainer.commands", "demo", "--fast", "--out", str(out), "--workers", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"mlflow ui --backend-store-uri sqlite:///{out.resolve() / 'mlflow.db'}" in proc.stdout, proc.stdout

    assert list((out / "shards").glob("*.tar")) and (out / "shards" / "manifest.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    for key in ("vae_checkpoint", "dit_checkpoint"):
        assert (Path(summary[key]) / "meta.json").exists(), key
    files = [Path(f) for f in summary["samples"]]
    assert all(f.exists() for f in files)
    assert sorted(f.name for f in files if f.name.startswith("compare_")) == [f"compare_{i:02d}.png" for i in range(4)]
    assert len([f for f in files if f.suffix == ".glb"]) == 4
    assert (out / "dinov2-tiny" / "config.json").exists() and "tiny RANDOM DINOv2" in proc.stdout

    table = summary["nearest_table"]
    assert [row["shape"] for row in table] == ["spot.obj", "suzanne.obj", "teapot.obj", "cow.obj"]
    assert summary["nearest_correct"] == sum(row["nearest"] == row["shape"] for row in table)
    assert summary["nearest_correct"] >= 3, proc.stdout[-1500:]
    report = json.loads((out / "eval.json").read_text())
    # --fast trains 500 steps: a pipeline check, not a quality one (test_vae_quality and test_train's
    # `shapeflow eval` of a trained VAE hold the IoU bars)
    assert report["samples"] == 2 and set(report["mean"]) >= {"iou", "chamfer", "fscore"}

    client = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name("shapeflow-demo")
    runs = {r.data.params["task"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"vae", "dit"} and all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["vae"].info.run_id == summary["mlflow_runs"]["vae"]
    assert "loss" in runs["dit"].data.metrics and "demo_eval/iou" in runs["vae"].data.metrics
    samples = {Path(a.path).name for a in client.list_artifacts(runs["dit"].info.run_id, "demo_samples")}
    assert {f.name for f in files} == samples
    assert (out / "mlartifacts").is_dir()                  # artifacts beside the store, not in the cwd
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()
