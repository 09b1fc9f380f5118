"""bench/scaling_model.py: counted FLOPs, the communication term, and its validation against the
bytes two gloo processes really hand to collectives (bench/comm_counter.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import scaling_model as sm  # noqa: E402


def test_counted_flops_match_the_transformer_estimate():
    """Forward + backward is about 6 x parameters x tokens plus 12 x depth x width x (T^2 + T x Tc) for
    self- and cross-attention; the counted value is somewhat lower because the adaLN and condition
    projections run on 1 and Tc tokens, not T."""
    import models

    batch, tokens, cond_tokens = 2, 2048, 1370
    flops, params = sm.step_flops("vecset_dit/debug", batch)
    cfg = models.config_for("vecset_dit/debug")
    estimate = 6 * params * tokens * batch + 12 * batch * cfg.depth * cfg.width * (tokens ** 2 + tokens * cond_tokens)
    assert 0.7 * estimate <= flops <= estimate, (flops, estimate)


def test_communication_term_grows_to_the_inter_node_limit():
    hw = sm.HARDWARE["h100"]
    payload = 1e9
    one_node = sm.comm_seconds("all_reduce", payload, 1, hw)
    assert one_node == pytest.approx(2 * 7 / 8 * payload / hw.nvlink)
    times = [sm.comm_seconds("all_reduce", payload, n, hw) for n in sm.NODE_COUNTS]
    assert times == sorted(times)
    limit = one_node + 2 * payload / 8 / hw.ib   # (n - 1) / n -> 1
    assert times[-1] < limit and times[-1] > 0.97 * limit
    assert sm.comm_seconds("all_gather", payload, 8, hw) == pytest.approx(
        sm.comm_seconds("all_reduce", payload, 8, hw) / 2)


def test_table_prints_every_strategy_and_node_count(capsys):
    assert sm.main(["--preset", "vecset_dit/debug", "--nodes", "8", "--batch", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(sm.STRATEGIES) * 2 * 3   # header + strategies x overlap x {1, 2, 8} nodes


def test_storage_bound_when_samples_are_large():
    w = sm.Workload("vecset_vae/base", batch=16, flops=16 * 0.87e12, params=38_000_000, sample_bytes=4.3e6)
    r = sm.predict(w, "ddp", 64, sm.HARDWARE["h100"], overlap=True)
    assert r["dominant"] == "data" and r["efficiency"] < 0.5
    small = sm.predict(sm.Workload(**{**vars(w), "sample_bytes": 0.25e6}), "ddp", 64, sm.HARDWARE["h100"], True)
    assert small["dominant"] == "compute" and small["efficiency"] > 0.9


@pytest.mark.slow
def test_predicted_bytes_match_two_gloo_processes():
    rows = sm.validate(["ddp", "fsdp2"])
    assert all(abs(r["ratio"] - 1) <= 0.10 for r in rows), rows
