"""The pure shard plans behind the loader, over many shard-size layouts (no I/O)."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from data_pipeline.loading.shard_order import eval_batches_per_stream, eval_segments, training_units


def layouts():
    rng = np.random.default_rng(0)
    for _ in range(40):
        counts = [int(c) for c in rng.integers(1, 7, size=int(rng.integers(1, 9)))]
        yield counts, int(rng.integers(1, 10))


@pytest.mark.parametrize("counts,streams", list(layouts()))
def test_training_units_give_every_stream_data_and_each_sample_once(counts, streams):
    if sum(counts) < streams:
        with pytest.raises(ValueError, match="at least one sample per stream"):
            training_units(counts, streams, seed=0, epoch=0)
        return
    for epoch in (0, 1):
        plan = training_units(counts, streams, seed=5, epoch=epoch)
        owned = [[(u.shard, i) for u in units for i in range(counts[u.shard]) if u.owns(i)] for units in plan]
        assert all(owned), "every stream gets at least one sample"
        seen = collections.Counter(pair for stream in owned for pair in stream)
        assert set(seen.values()) == {1} and len(seen) == sum(counts)
    assert training_units(counts, streams, 5, 3) == training_units(counts, streams, 5, 3)


@pytest.mark.parametrize("counts,streams", list(layouts()))
def test_eval_segments_cover_once_and_balance(counts, streams):
    plan = eval_segments(counts, streams)
    sizes = [sum(s.stop - s.start for s in segs) for segs in plan]
    pairs = collections.Counter((s.shard, i) for segs in plan for s in segs for i in range(s.start, s.stop))
    assert set(pairs.values()) == {1} and len(pairs) == sum(counts)
    assert max(sizes) - min(sizes) <= 1
    for batch in (1, 2, 3):
        assert eval_batches_per_stream(sum(counts), streams, batch) * batch >= max(sizes)


def test_shard_order_changes_with_epoch_and_seed():
    counts = [3] * 12
    orders = {(seed, epoch): [u.shard for u in training_units(counts, 1, seed, epoch)[0]]
              for seed in (0, 1) for epoch in (0, 1)}
    assert len({tuple(o) for o in orders.values()}) == 4


def test_interleave_takes_turns_and_refills():
    from data_pipeline.loading.loader import interleave
    sources = (iter([f"{name}{i}" for i in range(n)]) for name, n in [("a", 3), ("b", 1), ("c", 2)])
    assert list(interleave(sources, 2)) == ["a0", "b0", "a1", "c0", "a2", "c1"]
