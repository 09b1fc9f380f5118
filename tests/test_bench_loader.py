"""bench/bench_loader.py: the headroom over a measured training step and the loader processes it implies."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_loader as bl  # noqa: E402


def test_headroom_and_processes_for_10x():
    # 168 samples/s per process, batch 8: a batch takes 47.6 ms to load
    slow = bl.headroom_at(74.0, 8, 168.0)
    assert slow["headroom_per_process"] == pytest.approx(74.0 / (8 / 168.0))
    assert slow["processes_for_10x"] == 1
    fast = bl.headroom_at(0.017, 8, 170.0)   # a GPU step: 0.361x per process, so 10x needs 28 processes
    assert fast["headroom_per_process"] == pytest.approx(0.36125)
    assert fast["processes_for_10x"] == 28


def test_step_seconds_names_a_profile():
    assert bl.step_seconds("vecset_vae_base=0.017") == ("vecset_vae_base", 0.017)
    for bad in ("nope=1", "vecset_vae_base", "vecset_vae_base="):
        with pytest.raises(argparse.ArgumentTypeError, match="PROFILE=SECONDS"):
            bl.step_seconds(bad)
