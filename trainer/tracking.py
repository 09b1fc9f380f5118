"""MLflow tracking: one run per job, reattached on resume; only rank 0 talks to MLflow.

Store: ``MLFLOW_TRACKING_URI`` if set (a server, PostgreSQL, ...), else a sqlite file at
``run.dir/mlflow.db`` with artifacts under ``run.dir/mlartifacts``. Experiment:
``MLFLOW_EXPERIMENT_NAME`` or ``shapeflow``. Params are the flattened resolved config; metrics are
plain floats (tensors are converted here, never dropped); artifacts are files logged explicitly.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from data_pipeline.typed_config import flatten

DEFAULT_EXPERIMENT = "shapeflow"
PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer param values


def tracking_uri(run_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


def create_local_store(run_dir: Path) -> None:
    """Create ``run_dir/mlflow.db`` atomically: MLflow's schema migration runs on a temporary file
    that is renamed into place only when complete. A job killed during the first migration (seconds
    on a loaded machine) otherwise leaves a half-migrated database that every resume fails on
    ("duplicate column name"); found by bench/fault_campaign.py."""
    from mlflow.tracking import MlflowClient

    final = run_dir / "mlflow.db"
    if os.environ.get("MLFLOW_TRACKING_URI") or final.exists():
        return
    for stale in run_dir.glob("mlflow.db.tmp-*"):   # left by a job killed here
        stale.unlink(missing_ok=True)
    tmp = run_dir / f"mlflow.db.tmp-{os.getpid()}"
    MlflowClient(tracking_uri=f"sqlite:///{tmp.resolve()}").search_experiments()   # runs the migrations
    os.replace(tmp, final)


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


class Tracker:
    """Rank 0's MLflow run. Other ranks hold ``Tracker(enabled=False)``, whose calls do nothing."""

    def __init__(self, run_dir: Path, *, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.run_id: str | None = None
        self.client = None

    def start(self, config: Any, run_id: str | None = None) -> str | None:
        """Create the run (logging the config as params), or reattach to ``run_id``."""
        if not self.enabled:
            return None
        from mlflow.tracking import MlflowClient

        self.run_dir.mkdir(parents=True, exist_ok=True)
        create_local_store(self.run_dir)
        self.client = MlflowClient(tracking_uri=tracking_uri(self.run_dir))
        run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self._experiment_id(), run_name=self.run_dir.name,
                                     tags={"shapeflow.run_dir": str(self.run_dir.resolve())})
        self.run_id = run.info.run_id
        self._log_params(config)
        return self.run_id

    def _experiment_id(self) -> str:
        name = experiment_name()
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # local store: artifacts beside the database
            location = (self.run_dir.resolve() / "mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def _log_params(self, config: Any) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in sorted(flatten(config).items())]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items()) if math.isfinite(float(v))]
        for i in range(0, len(rows), 1000):
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Facts about this job (world size, strategy); a resumed job overwrites them with its own."""
        if self.enabled:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        if not self.enabled:
            return []
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def log_loss_curve(self, out_dir: Path, keys: tuple[str, ...] = ("loss",)) -> None:
        """Plot the full history (including before a resume) of ``keys`` and log the PNG."""
        if not self.enabled:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        histories = {key: sorted(self.metric_history(key)) for key in keys}
        histories = {key: h for key, h in histories.items() if h}
        if not histories:  # nothing logged yet (e.g. every step so far was skipped)
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, history in histories.items():
            ax.plot([s for s, _ in history], [v for _, v in history], label=key)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "loss_curve.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        self.log_artifact(path, "plots")

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.client.set_terminated(self.run_id, status=status)
