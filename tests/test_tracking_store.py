"""The local MLflow store survives a job killed while MLflow creates it (found by the fault campaign:
a SIGKILL during the first schema migration left a half-migrated mlflow.db on which every resume
failed with "duplicate column name"; the same kill of an in-place migration, checked by hand on
2026-12-02, leaves such a database)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from trainer.tracking import Tracker

REPO = Path(__file__).resolve().parent.parent

# Kill this very process (SIGKILL, as a scheduler or the OOM killer would) after the 40th SQL
# statement, i.e. in the middle of MLflow's schema migrations.
KILL_MID_MIGRATION = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import sqlalchemy
    executed = []
    def count(*args):
        executed.append(1)
        if len(executed) == 40:
            os.kill(os.getpid(), signal.SIGKILL)
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "after_cursor_execute", count)
    run_dir = Path(sys.argv[1])
    from trainer.tracking import create_local_store
    create_local_store(run_dir)
""")


def killed_while_creating(run_dir: Path) -> None:
    run_dir.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILL_MID_MIGRATION, str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert proc.returncode == -9, proc.stderr[-2000:]


def test_a_kill_during_the_first_migration_leaves_no_broken_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # the tracker's way: nothing at mlflow.db until the migration is complete; the next start works
    atomic = tmp_path / "atomic"
    killed_while_creating(atomic)
    assert not (atomic / "mlflow.db").exists() and list(atomic.glob("mlflow.db.tmp-*"))
    tracker = Tracker(atomic)
    run_id = tracker.start({"a": 1})
    tracker.log_metrics({"loss": 0.5}, step=1)
    assert tracker.metric_history("loss") == [(1, 0.5)] and run_id
    assert not list(atomic.glob("mlflow.db.tmp-*")), "the stale temporary store is removed"
    tracker.finish()
