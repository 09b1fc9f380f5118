"""Progress output off a terminal: plain lines, never a bar's carriage-return fragments (SLURM job logs)."""
from __future__ import annotations

import io
import subprocess
import sys

from conftest import MESH_DIR, TINY_CONFIG

from data_pipeline.progress import PlainProgress, progress


def test_plain_progress_prints_whole_lines_with_counts_rate_and_eta():
    stream = io.StringIO()
    bar = PlainProgress(total=4, desc="preprocess job 0/1", unit="mesh", stream=stream, interval=0.0)
    for _ in range(4):
        bar.set_postfix(failed=1)
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 5                                    # every update (interval 0) and the closing line
    assert lines[0].startswith("preprocess job 0/1: 1/4 mesh (25.0%) failed=1, ")
    assert lines[-1].startswith("preprocess job 0/1: 4/4 mesh (100.0%) failed=1, ") and "ETA 0:00:00" in lines[-1]


def test_plain_progress_waits_for_its_interval_and_unknown_totals_have_no_eta():
    stream = io.StringIO()
    bar = PlainProgress(total=0, desc="eval", unit="batch", stream=stream, interval=3600.0)
    for _ in range(50):
        bar.update(1)
    assert stream.getvalue() == ""                            # nothing before the interval has passed
    bar.close()
    assert stream.getvalue().startswith("eval: 50 batch, ") and "ETA" not in stream.getvalue()


def test_progress_is_a_bar_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress(3, "x", "mesh", stream=io.StringIO()), PlainProgress)
    assert not isinstance(progress(3, "x", "mesh", stream=Terminal()), PlainProgress)


def test_preprocess_to_a_log_file_writes_plain_progress_lines(tmp_path):
    """`shapeflow preprocess` with stderr redirected (as under SLURM): no carriage returns, a final line."""
    result = subprocess.run(
        [sys.executable, "-m", "trainer.commands", "preprocess", str(MESH_DIR / "wallhole.obj"),
         str(MESH_DIR / "featuretype.STL"), "--out", str(tmp_path / "out"), "--config", str(TINY_CONFIG), "views=0"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr
    assert "preprocess job 0/1: 2/2 mesh (100.0%) failed=0, " in result.stderr
