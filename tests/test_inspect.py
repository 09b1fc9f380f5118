"""`shapeflow inspect` on real shards (see loader_fixtures.py)."""
from __future__ import annotations

import matplotlib.image
from loader_fixtures import shard_files, stored_samples

from trainer import commands as cli


def test_inspect_reports_counts_keys_failures_and_writes_a_preview(loader_shards, tmp_path, capsys):
    out = tmp_path / "preview.png"
    assert cli.main(["inspect", str(loader_shards), "--out", str(out), "--num-preview", "3"]) == 0
    text = capsys.readouterr().out
    for path in shard_files(loader_shards):
        count = len(stored_samples(loader_shards, [path]))
        line = next(row for row in text.splitlines() if row.startswith(path.name))
        assert line.split()[1:4] == [str(count), str(count), "ok"], line
    total = len(stored_samples(loader_shards))
    assert f"{len(shard_files(loader_shards))} shards, {total} good samples" in text
    surface = next(row for row in text.splitlines() if row.startswith("surface.npy"))
    assert f"{total}/{total}" in surface and "uint16" in surface
    low, high = (float(v) for v in surface.split("[")[1].rstrip("]").split(","))
    assert -0.96 <= low < 0 < high <= 0.96  # dequantised: the longest side spans [-0.95, 0.95]
    assert "failures.jsonl: 1 rejected inputs" in text
    lines = text.splitlines()
    head = next(i for i, row in enumerate(lines) if row.startswith(f"quality: {total} samples"))
    p95 = [float(row.split()[2]) for row in lines[head + 2:head + 2 + min(total, 10)]]
    assert p95 == sorted(p95, reverse=True) and 0 < p95[0] <= 2.0     # worst first, all within the gate
    assert text.strip().splitlines()[-1] == f"preview: {out.resolve()}"
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 100 and image.shape[1] > 3 * image.shape[0] // 2  # three panels side by side


def test_inspect_flags_a_truncated_shard(shard_copy, tmp_path, capsys):
    victim = shard_files(shard_copy)[-1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert cli.main(["inspect", str(shard_copy), "--out", str(tmp_path / "p.png")]) == 1
    text = capsys.readouterr().out
    line = next(row for row in text.splitlines() if row.startswith(victim.name))
    assert "DAMAGED" in line and "manifest" not in line.split("DAMAGED")[1], line   # counted, not a mismatch
    problems = text.split("problem(s):")[1].splitlines()
    assert any(row.strip().startswith(f"{victim}:") for row in problems), text   # the shard is named
