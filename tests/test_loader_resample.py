"""Training-time resampling (issue 11 item 5): a fresh uniform subset of the stored points and a
random-start FPS of its leading points at every read, on for VAE training, off for evaluation."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from data_pipeline import make_loader
from data_pipeline.loading.batches import fresh_fps_indices


def stored_points(n=400, seed=0):
    return np.random.default_rng(seed).integers(0, 65535, size=(n, 3), dtype=np.uint16)


def is_fps_order(points: np.ndarray, k: int) -> bool:
    """Each of the first k points is (one of) the farthest from those before it, among all points."""
    pts = points.astype(np.float64)
    nearest = np.linalg.norm(pts - pts[0], axis=1)
    for i in range(1, k):
        if nearest[i] < nearest.max() * (1 - 1e-9):
            return False
        nearest = np.minimum(nearest, np.linalg.norm(pts - pts[i], axis=1))
    return True


def test_fresh_subsets_are_uniform_over_all_stored_points():
    points, rng = stored_points(), np.random.default_rng(1)
    draws = [fresh_fps_indices(points, 40, 8, rng) for _ in range(2000)]
    assert all(len(set(d.tolist())) == 40 for d in draws)              # without replacement
    counts = np.bincount(np.concatenate(draws), minlength=len(points))  # expected 200 per point
    assert counts.min() > 200 - 5 * 200 ** 0.5 and counts.max() < 200 + 5 * 200 ** 0.5
    assert len({tuple(d[:8]) for d in draws[:50]}) == 50                 # a different subset every read


def test_leading_points_are_an_fps_order_from_a_random_start():
    points, rng = stored_points(), np.random.default_rng(2)
    draws = [fresh_fps_indices(points, 64, 16, rng) for _ in range(30)]
    for idx in draws:
        subset = points[idx]
        assert is_fps_order(subset, 16)
    assert not is_fps_order(points[draws[0]], 40)                        # only num_fps points are ordered
    starts = [int(d[0]) for d in draws]
    assert len(set(starts)) > 20                                        # the start moves



def surfaces_by_id(shards, mode, count, **options):
    out: dict[str, list[np.ndarray]] = {}
    loader = make_loader(shards, task="vae", batch_size=1, mode=mode, seed=0,
                         num_surface=64, num_sharp=16, num_fps=16, num_sharp_fps=8, **options)
    for batch in itertools.islice(iter(loader), count):
        out.setdefault(batch["id"][0], []).append(batch["surface"][0].numpy())
    return out


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_training_loader_redraws_points_every_epoch_and_eval_does_not(loader_shards, mode):  # noqa: F811
    total = 2 * sum(1 for _ in make_loader(loader_shards, task="vae", batch_size=1, mode="eval", seed=0))
    seen = surfaces_by_id(loader_shards, mode, total if mode == "train" else total // 2)
    if mode == "eval":   # one pass; a second loader gives the same (fixed FPS prefix) points
        again = surfaces_by_id(loader_shards, mode, total // 2)
        assert all(np.array_equal(seen[k][0], again[k][0]) for k in seen)
        return
    repeated = {k: v for k, v in seen.items() if len(v) >= 2}
    assert repeated and all(not np.array_equal(v[0], v[1]) for v in repeated.values())
    for v in repeated.values():
        assert is_fps_order(v[0], 16)


def test_resampling_can_be_switched_off_for_training(loader_shards):  # noqa: F811
    total = 2 * sum(1 for _ in make_loader(loader_shards, task="vae", batch_size=1, mode="eval", seed=0))
    seen = surfaces_by_id(loader_shards, "train", total, resample=False)
    repeated = [v for v in seen.values() if len(v) >= 2]
    assert repeated and all(np.array_equal(v[0], v[1]) for v in repeated)


def test_coincident_points_keep_the_count():
    """Quantised sharp-edge points can coincide; FPS then repeats rows, which must not add points."""
    points = np.repeat(stored_points(10), 5, axis=0)                    # 10 distinct points, 50 rows
    for seed in range(20):
        idx = fresh_fps_indices(points, 30, 20, np.random.default_rng(seed))
        assert len(idx) == 30 and len(set(idx.tolist())) == 30
