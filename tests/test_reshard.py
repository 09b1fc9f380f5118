"""shapeflow reshard: compact shards keep the FPS prefix, uniform query subsets, ids, checksums and
provenance, and the loader reads them with a fraction of the bytes."""
from __future__ import annotations

import collections
import json

import numpy as np
from loader_fixtures import stored_samples

from data_pipeline import make_loader
from data_pipeline.preprocess.pipeline import encode_npy
from data_pipeline.reshard import random_subset
from trainer import commands as cli

OPTIONS = dict(num_surface=64, num_sharp=16, num_vol=16, num_near=16)
POOL = 2


def test_reshard_keeps_fps_prefix_query_subsets_ids_and_checksums(loader_shards, tmp_path):
    out = tmp_path / "compact"
    args = ["reshard", str(loader_shards), "--out", str(out), "--task", "vae", "--options", json.dumps(OPTIONS),
            "--pool", str(POOL), "--shard-max-samples", "4"]
    assert cli.main(args) == 0
    source, compact = stored_samples(loader_shards), stored_samples(out)
    assert set(compact) == set(source)
    for sample_id, small in compact.items():
        full = source[sample_id]
        keep = POOL * (OPTIONS["num_surface"] + OPTIONS["num_sharp"])
        assert np.array_equal(small["surface.npy"], full["surface.npy"][:keep])    # FPS order first, kept
        assert np.array_equal(small["surface_fps.npy"], np.arange(min(keep, len(full["surface_fps.npy"]))))
        for name, count in (("vol", OPTIONS["num_vol"]), ("near", OPTIONS["num_near"])):
            rows = {tuple(p) + (s,) for p, s in zip(full[f"{name}.npy"].tolist(), full[f"{name}_sdf.npy"].tolist())}
            kept = [tuple(p) + (s,) for p, s in zip(small[f"{name}.npy"].tolist(), small[f"{name}_sdf.npy"].tolist())]
            assert len(kept) == min(POOL * count, len(full[f"{name}.npy"])) and set(kept) <= rows
        assert "occ.npy" not in small and "sharp_near.npy" not in small   # members the task does not read
        meta = small["json"]
        assert meta["id"] == sample_id and meta["source"] == full["json"]["source"]
        assert meta["reshard"]["source_checksums"] == full["json"]["xxh3_64"] and meta["reshard"]["pool"] == POOL
    # the loader verifies the new checksums and gives the same FPS surface for every sample, reading less
    loaders = [make_loader(d, batch_size=2, mode="eval", seed=0, task="vae", **OPTIONS) for d in (loader_shards, out)]
    batches = [{i: s for b in loader for i, s in zip(b["id"], b["surface"])} for loader in loaders]
    assert batches[0].keys() == batches[1].keys()
    assert all(np.array_equal(batches[0][i], batches[1][i]) for i in batches[0])
    full_stats, small_stats = loaders[0].stats, loaders[1].stats
    assert small_stats["corrupt_samples"] == 0 and small_stats["unverified_shards"] == 0
    assert small_stats["bytes_read"] < 0.6 * full_stats["bytes_read"]
    # a rerun skips what is there
    before = sorted(p.read_bytes() for p in out.glob("*.tar"))
    assert cli.main(args) == 0 and sorted(p.read_bytes() for p in out.glob("*.tar")) == before


def test_query_subsets_are_uniform_and_shuffled():
    """Every stored row is kept equally often over seeds, and not in stored order."""
    rows, keep, trials = 40, 10, 4000
    raw = {"__key__": "x", "vol.npy": encode_npy(np.arange(rows * 3, dtype=np.uint16).reshape(rows, 3)),
           "vol_sdf.npy": encode_npy(np.arange(rows, dtype=np.float16))}
    seen, sorted_runs = collections.Counter(), 0
    for seed in range(trials):
        arrays: dict = {}
        random_subset(arrays, raw, "vol", keep, np.random.default_rng(seed))
        ids = arrays["vol_sdf.npy"].astype(int).tolist()
        seen.update(ids)
        sorted_runs += ids == sorted(ids)
    expected = trials * keep / rows                               # 1000 per row
    assert all(abs(seen[r] - expected) < 5 * expected ** 0.5 for r in range(rows)), seen
    assert sorted_runs < trials * 0.01
