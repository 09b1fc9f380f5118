"""The streaming loader on real shards (written by `shapeflow preprocess`, see loader_fixtures.py).

Multi-rank behaviour is simulated in one process with explicit rank/world_size here;
test_loader_distributed.py runs real processes over gloo.
"""
from __future__ import annotations

import collections
import itertools
import json
import random

import numpy as np
import pytest
import torch
from loader_fixtures import OCC_RESOLUTION, shard_files, stored_samples

from data_pipeline import make_loader
from data_pipeline.loading.batches import BadSample, parse_task_options, sample_arrays
from data_pipeline.loading.loader import LoaderWarning, training_epoch_samples
from data_pipeline.preprocess.pipeline import encode_npy
from data_pipeline.schema import dequantize_coords, dequantize_normals, unpack_occupancy
from data_pipeline.typed_config import ConfigError

SMALL = dict(task="vae", num_surface=64, num_vol=16, num_near=16)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def raw_id(raw) -> str:
    return str(json.loads(raw["json"]).get("id", raw["__key__"]))


@pytest.fixture(scope="module")
def all_ids(loader_shards):
    return sorted(stored_samples(loader_shards))


def test_fixture_has_uneven_shards(loader_shards):
    counts = [len(stored_samples(loader_shards, [p])) for p in shard_files(loader_shards)]
    assert len(counts) >= 3 and len(set(counts)) > 1, counts


# ---------------------------------------------------------------------------
# training mode: assignment, order, resume
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (1, 2), (2, 0), (2, 1), (4, 0), (4, 2)])
def test_training_streams_are_disjoint_and_cover_everything(loader_shards, all_ids, world_size, num_workers):
    for epoch in (0, 1):
        streams = []
        for rank in range(world_size):
            loader = make_loader(loader_shards, batch_size=2, mode="train", seed=3, rank=rank,
                                 world_size=world_size, num_workers=num_workers, **SMALL)
            for worker in range(max(1, num_workers)):
                stream = loader.plan.stream_index(worker)
                streams.append([raw_id(r) for r in training_epoch_samples(loader.plan, stream, epoch, [])])
        assert all(streams), "a stream got no data (more streams than shards must split shards)"
        counts = collections.Counter(i for ids in streams for i in ids)
        assert sorted(counts) == all_ids and set(counts.values()) == {1}


def test_training_batches_through_dataloader_workers_follow_the_plan(loader_shards, all_ids):
    """Real DataLoader workers, 2 ranks x 2 workers: epoch 0 of all streams together is the data set once."""
    epoch0 = []
    for rank in range(2):
        loader = make_loader(loader_shards, batch_size=1, mode="train", seed=1, rank=rank, world_size=2,
                             num_workers=2, **SMALL)
        for batch in loader:
            state = loader.state_dict()
            worker = (state["next_worker"] - 1) % 2
            if state["streams"][worker]["epoch"] == 0:
                epoch0 += batch["id"]
            if min(s["epoch"] for s in state["streams"]) >= 1:
                break
    assert sorted(epoch0) == all_ids


def test_same_seed_same_order_other_epoch_or_seed_differs(loader_shards):
    def first_ids(seed, num_workers=0):
        random.seed(seed + 100), np.random.seed(seed + 200), torch.manual_seed(seed + 300)  # must not matter
        loader = make_loader(loader_shards, batch_size=2, mode="train", seed=seed, num_workers=num_workers, **SMALL)
        return [b["id"] for b in take(loader, 8)]

    assert first_ids(7) == first_ids(7)
    assert first_ids(7, num_workers=1) == first_ids(7, num_workers=1)
    assert first_ids(7) != first_ids(8)
    plan = make_loader(loader_shards, batch_size=2, mode="train", seed=7, **SMALL).plan
    epochs = [[raw_id(r) for r in training_epoch_samples(plan, 0, epoch, [])] for epoch in (0, 1, 0)]
    assert epochs[0] == epochs[2] and epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])


@pytest.mark.parametrize("rank,world_size,num_workers,stop", [(0, 1, 0, 4), (1, 2, 2, 3), (0, 1, 2, 5)])
def test_resumed_stream_equals_uninterrupted(loader_shards, rank, world_size, num_workers, stop):
    kw = dict(batch_size=3, mode="train", seed=5, rank=rank, world_size=world_size, num_workers=num_workers,
              token_cutoffs=[8, 16, 32], num_sharp=8, shuffle_buffer=4, **SMALL)
    uninterrupted = make_loader(loader_shards, **kw)
    reference = take(uninterrupted, 9)  # several epochs of this stream
    first = make_loader(loader_shards, **kw)
    head = take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))     # what a checkpoint stores
    resumed = make_loader(loader_shards, **kw)
    resumed.load_state_dict(state)
    tail = take(resumed, 9 - stop)
    for ref, got in zip(reference, head + tail):
        assert ref["id"] == got["id"]
        for key in ref.keys() - {"id"}:
            assert torch.equal(ref[key], got[key]), key
    # the resumed cursor is where the uninterrupted one is, past the first epoch (27 samples > the data set)
    assert resumed.state_dict() == json.loads(json.dumps(uninterrupted.state_dict()))
    assert resumed.epoch == uninterrupted.epoch >= 1


def test_cursor_from_another_setup_is_rejected(loader_shards):
    loader = make_loader(loader_shards, batch_size=2, mode="train", seed=1, **SMALL)
    take(loader, 2)
    other = make_loader(loader_shards, batch_size=2, mode="train", seed=2, **SMALL)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(loader.state_dict())
    two = make_loader(loader_shards, batch_size=2, mode="train", seed=1, num_workers=2, **SMALL)
    with pytest.raises(ValueError, match="num_workers"):
        two.load_state_dict(loader.state_dict())
    same = make_loader(loader_shards, batch_size=2, mode="train", seed=1, **SMALL)
    same.load_state_dict({"ranks": [loader.state_dict()]})  # the gathered form works too
    assert same.state_dict() == loader.state_dict()


# ---------------------------------------------------------------------------
# evaluation mode
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("world_size,num_workers,batch_size", [(1, 0, 4), (2, 0, 2), (2, 2, 2), (4, 1, 3), (4, 0, 1)])
def test_eval_every_sample_once_and_equal_batch_counts(loader_shards, all_ids, world_size, num_workers, batch_size):
    seen, batches_per_rank = [], []
    for rank in range(world_size):
        loader = make_loader(loader_shards, batch_size=batch_size, mode="eval", seed=0, rank=rank,
                             world_size=world_size, num_workers=num_workers, **SMALL)
        batches = list(loader)
        batches_per_rank.append(len(batches))
        assert len(batches) == len(loader)
        for b in batches:
            assert len(b["id"]) == batch_size and b["surface"].shape[0] == batch_size
            seen += [i for i, ok in zip(b["id"], b["valid"].tolist()) if ok]
        assert [b["id"] for b in loader] == [b["id"] for b in batches]  # a second pass is the same pass
    assert len(set(batches_per_rank)) == 1, batches_per_rank
    assert sorted(seen) == all_ids


def test_eval_resume_mid_pass(loader_shards, all_ids):
    kw = dict(batch_size=2, mode="eval", seed=0, num_workers=2, **SMALL)
    full = [b["id"] for b in make_loader(loader_shards, **kw)]
    first = make_loader(loader_shards, **kw)
    head = [b["id"] for b in take(first, 2)]
    resumed = make_loader(loader_shards, **kw)
    resumed.load_state_dict(first.state_dict())
    assert head + [b["id"] for b in resumed] == full


# ---------------------------------------------------------------------------
# batch content
# ---------------------------------------------------------------------------

def test_vae_batch_shapes_and_dtypes(loader_shards):
    loader = make_loader(loader_shards, task="vae", batch_size=3, mode="train", seed=0, num_surface=200,
                         num_sharp=32, num_vol=40, num_near=50, num_sharp_near=10, occupancy=True,
                         token_cutoffs=[64, 128])
    batch = next(iter(loader))
    f32 = torch.float32
    expected = {"surface": ((3, 200, 3), f32), "surface_normal": ((3, 200, 3), f32),
                "sharp": ((3, 32, 3), f32), "sharp_normal": ((3, 32, 3), f32), "sharp_valid": ((3, 32), torch.bool),
                "query": ((3, 100, 3), f32), "sdf": ((3, 100), f32), "occ": ((3, 1) + (OCC_RESOLUTION,) * 3, f32),
                "center": ((3, 3), f32), "scale": ((3,), f32), "valid": ((3,), torch.bool),
                "num_tokens": ((), torch.int64)}
    assert set(batch) == set(expected) | {"id"}
    for key, (shape, dtype) in expected.items():
        assert tuple(batch[key].shape) == shape and batch[key].dtype == dtype, key
    assert len(batch["id"]) == 3 and int(batch["num_tokens"]) in (64, 128)
    assert batch["surface"].abs().max() <= 1.0 and torch.allclose(batch["surface_normal"].norm(dim=-1),
                                                                  torch.ones(3, 200), atol=1e-5)


def test_dit_batch_shapes(loader_shards):
    batch = next(iter(make_loader(loader_shards, task="dit", batch_size=2, mode="eval", seed=0, num_surface=128)))
    assert set(batch) == {"id", "surface", "surface_normal", "center", "scale", "valid"}
    assert batch["surface"].shape == (2, 128, 3) and batch["surface"].dtype == torch.float32


def test_dequantised_values_match_the_stored_ones(loader_shards):
    stored = stored_samples(loader_shards)
    loader = make_loader(loader_shards, task="vae", batch_size=2, mode="eval", seed=0, num_surface=100,
                         num_vol=30, num_near=30, occupancy=True)
    for batch in loader:
        for row, sample_id in enumerate(batch["id"]):
            s = stored[sample_id]
            fps = s["surface_fps.npy"][:100]
            np.testing.assert_array_equal(batch["surface"][row].numpy(), dequantize_coords(s["surface.npy"][fps]))
            np.testing.assert_array_equal(batch["surface_normal"][row].numpy(),
                                          dequantize_normals(s["surface_normal.npy"][fps]))
            np.testing.assert_array_equal(batch["occ"][row, 0].numpy(),
                                          unpack_occupancy(s["occ.npy"], OCC_RESOLUTION).astype(np.float32))
            # every query is a stored point with its stored SDF (first vol, then near)
            for key, part in (("vol", slice(0, 30)), ("near", slice(30, 60))):
                table = {tuple(p): v for p, v in zip(dequantize_coords(s[f"{key}.npy"]), s[f"{key}_sdf.npy"])}
                for p, v in zip(batch["query"][row, part].numpy(), batch["sdf"][row, part].numpy()):
                    assert table[tuple(p)] == np.float32(v)
            np.testing.assert_allclose(batch["center"][row].numpy(), s["json"]["center"], rtol=1e-6)


def raw_sample(sample: dict, json_meta: dict) -> dict:
    """A raw (bytes) shard sample from arrays, as the tar reader hands it to the decoder."""
    raw = {"__key__": json_meta["id"], "json": json.dumps(json_meta).encode()}
    raw.update({key: encode_npy(v) for key, v in sample.items() if key != "json"})
    return raw


def old_layout(sample: dict, rng) -> tuple[dict, dict]:
    """The same points in the pre-``fps_prefix_stored`` layout: rows shuffled, FPS orders index them."""
    old = dict(sample)
    for name in ("surface", "sharp"):
        perm = rng.permutation(len(sample[f"{name}.npy"]))        # old row j holds new row perm[j]
        where = np.argsort(perm)                                  # new row i sits at old row where[i]
        old[f"{name}.npy"], old[f"{name}_normal.npy"] = sample[f"{name}.npy"][perm], sample[f"{name}_normal.npy"][perm]
        old[f"{name}_fps.npy"] = where[sample[f"{name}_fps.npy"]].astype(np.int32)
    meta = {k: v for k, v in sample["json"].items() if k != "fps_prefix_stored"}
    return old, meta


def test_fps_prefix_slices_equal_the_gather_of_old_layout_shards(loader_shards):
    opts = parse_task_options("dit", dict(num_surface=100, num_sharp=48))
    rng = np.random.default_rng(0)
    for sample in stored_samples(loader_shards).values():
        assert sample["json"]["fps_prefix_stored"] is True
        old, old_meta = old_layout(sample, rng)
        assert not np.array_equal(old["surface_fps.npy"], sample["surface_fps.npy"])
        new_out = sample_arrays(raw_sample(sample, sample["json"]), "dit", opts, np.random.default_rng(1))
        old_out = sample_arrays(raw_sample(old, old_meta), "dit", opts, np.random.default_rng(1))
        for key in ("surface", "surface_normal", "sharp", "sharp_normal", "sharp_valid"):
            np.testing.assert_array_equal(new_out[key], old_out[key], err_msg=key)
        fps = sample["surface_fps.npy"][:100]
        np.testing.assert_array_equal(new_out["surface"], dequantize_coords(sample["surface.npy"][fps]))


def test_random_subsets_and_a_wrong_prefix_flag(loader_shards):
    opts = parse_task_options("dit", dict(num_surface=100, num_sharp=8, surface_sampling="random"))
    sample = next(iter(stored_samples(loader_shards).values()))
    for layout, meta in ((sample, sample["json"]), old_layout(sample, np.random.default_rng(0))):
        out = sample_arrays(raw_sample(layout, meta), "dit", opts, np.random.default_rng(2))
        stored = {tuple(p) for p in dequantize_coords(layout["surface.npy"])}
        picked = {tuple(p) for p in out["surface"]}
        assert len(picked) == 100 and picked <= stored
        assert picked != {tuple(p) for p in dequantize_coords(layout["surface.npy"][:100])}  # not the FPS prefix
    old, _ = old_layout(sample, np.random.default_rng(0))   # shuffled orders but the json claims a prefix
    with pytest.raises(BadSample, match="fps_prefix_stored"):
        sample_arrays(raw_sample(old, sample["json"]), "dit", parse_task_options("dit", {}), np.random.default_rng(0))


# ---------------------------------------------------------------------------
# failures, options, sources
# ---------------------------------------------------------------------------

def truncate(path, cut):
    data = path.read_bytes()
    size = int(len(data) * 0.55)
    # "block": cut at a 512-byte tar block boundary, where Python's tarfile just stops without an error
    path.write_bytes(data[: size - size % 512 if cut == "block" else size])


@pytest.mark.parametrize("cut", ["mid-member", "block"])
def test_truncated_shard_is_skipped_counted_and_the_job_continues(shard_copy, all_ids, cut):
    victim = max(shard_files(shard_copy), key=lambda p: p.stat().st_size)
    victim_ids = set(stored_samples(shard_copy, [victim]))
    truncate(victim, cut)
    with pytest.warns(LoaderWarning, match=victim.name):
        ranks = [make_loader(shard_copy, batch_size=2, mode="eval", seed=0, world_size=2, rank=r, **SMALL)
                 for r in range(2)]
        batches = [list(loader) for loader in ranks]
    assert len(batches[0]) == len(batches[1])  # still balanced: the lost samples became padding
    seen = [i for part in batches for b in part for i, ok in zip(b["id"], b["valid"].tolist()) if ok]
    assert len(seen) == len(set(seen)) and set(seen) <= set(all_ids)
    assert set(seen) >= set(all_ids) - victim_ids       # every other shard was read in full
    assert set(seen) & victim_ids < victim_ids          # the truncated part is gone
    assert sum(loader.stats["corrupt_shards"] for loader in ranks) == 1
    assert [str(victim)] in [loader.stats["failed_shards"] for loader in ranks]

    train = make_loader(shard_copy, batch_size=2, mode="train", seed=0, num_workers=2, **SMALL)
    with pytest.warns(LoaderWarning, match=victim.name):  # events travel from the workers with the batches
        ids = [i for b in take(train, 12) for i in b["id"]]   # > one epoch: the job continues
    assert len(ids) == 24 and set(ids) <= set(all_ids)
    assert train.stats["corrupt_shards"] >= 1 and train.stats["failed_shards"] == [str(victim)]


def test_garbage_shard_is_skipped(shard_copy, all_ids):
    victim = shard_files(shard_copy)[0]
    victim_ids = set(stored_samples(shard_copy, [victim]))
    victim.write_bytes(b"this is not a tar file" * 100)
    with pytest.warns(LoaderWarning, match=victim.name):
        loader = make_loader(shard_copy, batch_size=2, mode="eval", seed=0, **SMALL)
        seen = [i for b in loader for i, ok in zip(b["id"], b["valid"].tolist()) if ok]
    assert sorted(seen) == sorted(set(all_ids) - victim_ids)
    assert loader.stats["failed_shards"] == [str(victim)]


def test_unknown_and_bad_options_name_the_problem(loader_shards):
    with pytest.raises(ConfigError, match="num_surfaces"):
        make_loader(loader_shards, task="vae", batch_size=2, mode="train", seed=0, num_surfaces=10)
    with pytest.raises(ConfigError, match="condition"):
        make_loader(loader_shards, task="dit", batch_size=2, mode="train", seed=0, condition="text")
    with pytest.raises(ValueError, match="task"):
        make_loader(loader_shards, task="gan", batch_size=2, mode="train", seed=0)
    with pytest.raises(ValueError, match="mode"):
        make_loader(loader_shards, task="vae", batch_size=2, mode="training", seed=0)
    with pytest.raises(ValueError, match="at least one sample per stream"):
        make_loader(loader_shards, batch_size=2, mode="train", seed=0, world_size=8, rank=0, num_workers=2, **SMALL)
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        make_loader(str(loader_shards / "nope.tar"), task="vae", batch_size=2, mode="train", seed=0)


def test_every_source_form_reads_the_same_samples(loader_shards, all_ids, tmp_path):
    tars = shard_files(loader_shards)
    sources = {
        "directory": str(loader_shards),
        "manifest": str(loader_shards / "manifest.json"),
        "list": [str(p) for p in tars],
        "brace": f"{loader_shards}/{{{','.join(p.name for p in tars)}}}",
        "pipe": [f"pipe:cat {p}" for p in tars],
    }
    expected = collections.Counter(all_ids)
    for name, source in sources.items():
        kw = {"cache_dir": str(tmp_path / "cache")} if name == "pipe" else {}
        loader = make_loader(source, batch_size=4, mode="eval", seed=0, **kw, **SMALL)
        ids = [i for b in loader for i, ok in zip(b["id"], b["valid"].tolist()) if ok]
        assert collections.Counter(ids) == expected, name
    assert len(list((tmp_path / "cache").iterdir())) == len(tars)  # pipe: shards were cached locally


def test_pipe_sources_stream_like_local_files(loader_shards):
    tars = shard_files(loader_shards)
    piped = make_loader([f"pipe:cat {p}" for p in tars], batch_size=2, mode="train", seed=4, **SMALL)
    local = make_loader([str(p) for p in tars], batch_size=2, mode="train", seed=4, **SMALL)
    assert [b["id"] for b in take(piped, 6)] == [b["id"] for b in take(local, 6)]


def run_ranks(loaders, steps: int) -> list[str]:
    """``steps`` batches from every rank (in turns, as synchronous training steps draw them): the ids."""
    iters = [iter(loader) for loader in loaders]
    return [i for _ in range(steps) for it in iters for i in next(it)["id"]]


def run_to_epoch_end(loaders) -> list[str]:
    """Each rank's batches until its streams are past epoch 0 (its last batch may hold epoch-1 rows;
    in training a rank that is done goes on into epoch 1 while the others finish)."""
    seen = []
    for loader in loaders:
        it = iter(loader)
        while loader.epoch == 0:
            seen += next(it)["id"]
    return seen


@pytest.mark.parametrize("before,after,workers_before,workers_after", [(2, 1, 0, 0), (1, 2, 0, 0), (2, 1, 2, 0)])
def test_resume_on_another_world_size_continues_the_pass(loader_shards, all_ids, before, after,
                                                         workers_before, workers_after):
    """A run saved on `before` ranks and resumed on `after` ranks sees every sample of the epoch once:
    duplicates are only the documented replay (samples of epoch 1 that old streams had consumed before
    the save) plus the rows of the last batches that reach into epoch 1."""
    def ranks(world, workers):
        return [make_loader(loader_shards, batch_size=2, mode="train", seed=5, rank=r, world_size=world,
                            num_workers=workers, shuffle_buffer=3, **SMALL) for r in range(world)]

    old = ranks(before, workers_before)
    seen = run_ranks(old, 3 if before == 1 else 1)
    saved = {"ranks": [loader.gathered_state_dict()["ranks"][0] for loader in old], "resized_from": None}
    saved = json.loads(json.dumps(saved))  # a checkpoint holds JSON
    for loader in old:
        loader.close()
    new = ranks(after, workers_after)
    for loader in new:
        loader.load_state_dict(saved)
    replayed = new[0].stats["resize_replayed"]   # epoch-1 samples the old run had consumed
    assert all(loader.stats["resize_replayed"] == replayed for loader in new)
    seen += run_to_epoch_end(new)
    counts = collections.Counter(seen)
    assert set(counts) == set(all_ids), "a sample of the epoch was skipped"
    # a stream whose epoch ends exactly at a batch end shows epoch 0 until its next batch (all epoch 1)
    straddle = sum(loader.plan.batch_size * loader.plan.workers for loader in new)
    assert len(seen) - len(all_ids) <= replayed + straddle, counts
    # a second, same-size resume of the resized run continues it exactly
    state = {"ranks": [loader.gathered_state_dict()["ranks"][0] for loader in new],
             "resized_from": new[0].gathered_state_dict()["resized_from"]}
    again = ranks(after, workers_after)
    for loader in again:
        loader.load_state_dict(json.loads(json.dumps(state)))
    assert run_ranks(again, 2) == run_ranks(new, 2)


def test_resume_resized_again_before_the_epoch_ends(loader_shards, all_ids):
    """2 ranks -> 1 rank for one step -> 2 ranks again, all inside epoch 0: the second resize replays
    the first one's skips (resized_from) and the epoch is still seen once."""
    def ranks(world):
        return [make_loader(loader_shards, batch_size=2, mode="train", seed=6, rank=r, world_size=world,
                            shuffle_buffer=3, **SMALL) for r in range(world)]

    def gathered(loaders):
        states = [loader.gathered_state_dict() for loader in loaders]
        history = next((s["resized_from"] for s in states if s["resized_from"]), None)
        return json.loads(json.dumps({"ranks": [s["ranks"][0] for s in states], "resized_from": history}))

    first = ranks(2)
    seen = run_ranks(first, 1)
    middle = ranks(1)
    middle[0].load_state_dict(gathered(first))
    seen += run_ranks(middle, 1)
    assert middle[0].epoch == 0 and gathered(middle)["resized_from"]["world_size"] == 2
    last = ranks(2)
    for loader in last:
        loader.load_state_dict(gathered(middle))
    seen += run_to_epoch_end(last)
    assert set(seen) == set(all_ids)
    replayed = sum(loader.stats["resize_replayed"] for loader in middle + last[:1])
    assert len(seen) - len(all_ids) <= replayed + sum(loader.plan.batch_size for loader in last)


def test_stats_count_bytes_read_from_storage(loader_shards):
    """Local shards: the used members plus tar headers (skipped members are seeked over; tarfile
    reads a member's 512-byte header block up to three times); a pipe: source streams every byte."""
    import tarfile

    tars = shard_files(loader_shards)
    local = make_loader([str(p) for p in tars], batch_size=4, mode="eval", seed=0, **SMALL)
    used, members = 0, 0
    for path in tars:
        with tarfile.open(path) as tar:
            infos = tar.getmembers()
        members += len(infos)
        used += sum(i.size for i in infos if i.name.partition(".")[2] in local.plan.keys)
    list(local)
    assert used <= local.stats["bytes_read"] <= used + 3 * 513 * members + 2048 * len(tars)
    assert local.stats["bytes_read"] < 0.9 * sum(p.stat().st_size for p in tars)  # the skipped members
    piped = make_loader([f"pipe:cat {p}" for p in tars], batch_size=4, mode="eval", seed=0, **SMALL)
    list(piped)
    assert piped.stats["bytes_read"] == sum(p.stat().st_size for p in tars)
    assert piped.stats["samples"] == local.stats["samples"] > 0


@pytest.mark.filterwarnings("ignore:loader. no manifest counts")
def test_dit_reads_cached_latents_class_ids_and_embeddings(loader_shards, tmp_path):
    """Later schema keys (latent.npy, embedding.npy, a class in json) added to real samples."""
    import io

    import webdataset as wds

    stored = stored_samples(loader_shards)
    names = ["chair", "table"]

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    with wds.TarWriter(str(tmp_path / "extra-000000.tar")) as sink:
        for n, (sample_id, s) in enumerate(sorted(stored.items())):
            meta = dict(s["json"], **{"class": names[n % 2]})
            sink.write({"__key__": sample_id, "json": json.dumps(meta).encode(),
                        "latent.npy": npy(np.full((4, 2), n, np.float16)),
                        "embedding.npy": npy(np.full((3, 5), -n, np.float16))})
    source = str(tmp_path / "extra-000000.tar")
    batch = next(iter(make_loader(source, task="dit", batch_size=3, mode="eval", seed=0, use_latents=True,
                                  condition="class", class_names=names)))
    assert set(batch) == {"id", "latent", "class_id", "center", "scale", "valid"}
    assert batch["latent"].shape == (3, 4, 2) and batch["latent"].dtype == torch.float32
    assert batch["class_id"].tolist() == [0, 1, 0] and batch["class_id"].dtype == torch.int64
    assert batch["latent"][:, 0, 0].tolist() == [0.0, 1.0, 2.0]
    batch = next(iter(make_loader(source, task="dit", batch_size=2, mode="eval", seed=0, use_latents=True,
                                  condition="embedding")))
    assert batch["condition"].shape == (2, 3, 5) and batch["condition"][1, 0, 0] == -1.0
    with pytest.warns(LoaderWarning, match="class 'table' is not in class_names"):
        loader = make_loader(source, task="dit", batch_size=2, mode="eval", seed=0, use_latents=True,
                             condition="class", class_names=["chair"])
        rows = [i for b in loader for i, ok in zip(b["id"], b["valid"].tolist()) if ok]
    assert len(rows) == (len(stored) + 1) // 2 and loader.stats["bad_samples"] == len(stored) // 2


def test_manifest_parts_are_the_truth_when_the_merged_view_lags(shard_copy, all_ids):
    """A SLURM-array job may have written a shard that manifest.json does not list yet."""
    merged = json.loads((shard_copy / "manifest.json").read_text())
    merged["shards"] = merged["shards"][:-1]
    (shard_copy / "manifest.json").write_text(json.dumps(merged))
    loader = make_loader(shard_copy, batch_size=4, mode="eval", seed=0, **SMALL)
    assert sorted(i for b in loader for i, ok in zip(b["id"], b["valid"].tolist()) if ok) == all_ids
