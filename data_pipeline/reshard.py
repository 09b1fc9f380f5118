"""``shapeflow reshard``: compact training shards for one task's loader options.

A sample written by ``shapeflow preprocess`` at the default counts is ~4.3 MB; a VecSet VAE base
step uses ~0.25 MB of it (docs/scaling.md: on a cluster the VAE is bound by storage). Resharding
keeps, per sample, only the members the task reads, and of each point set a *pool* of
``pool x`` the rows one step draws, chosen so that the loader's documented sampling still holds:

* surface / sharp points are stored FPS order first (json ``fps_prefix_stored``), so the first K
  rows are an FPS subset and any prefix of them is too: the compact set is the first K rows, its
  ``*_fps.npy`` is ``arange(min(K, stored FPS length))``. Surface keeps ``pool x (num_surface +
  num_sharp)`` rows (surface points also fill in for missing sharp points).
* query sets (vol, near, sharp_near) were drawn uniformly: the compact set is a uniform random
  subset without replacement of ``pool x count`` rows, stored in random order, so the loader's
  random subset of it (fresh every epoch) is still a uniform subset of the original.
* everything else the task reads (json, occ, latents, embeddings, views) is copied as it is.

The json keeps ``id`` and the provenance fields and gains ``reshard``: the source shard, the
source checksums of every member, the options and the pool. Checksums of the new members are
written by the preprocessing shard writer, so the loader verifies compact shards as any other.
Subsets are a pure function of (seed, sample id): rerunning gives identical shards, and a
resumed run skips the ids already written (the shard writer's resume).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from data_pipeline import schema
from data_pipeline.loading.batches import load_meta, load_npy, optional_keys, parse_task_options, required_keys
from data_pipeline.loading.shard_order import resolve_source, seeded_rng
from data_pipeline.loading.shard_reader import ReadCounter, shard_samples
from data_pipeline.preprocess.shard_writer import JobOutput

QUERY_SETS = ("vol", "near", "sharp_near")


@dataclass
class ReadPlan:
    """What shard_samples needs (the loader's Plan has the same fields)."""
    keys: tuple[str, ...]
    cache_dir: str | None = None
    cache_size: int = -1
    verify: bool = True


def pool_sizes(task: str, opts, pool: int) -> dict[str, int]:
    """Rows kept per point set (before clipping to what a sample has)."""
    sizes = {"surface": pool * (opts.num_surface + opts.num_sharp), "sharp": pool * opts.num_sharp}
    if task == "vae":
        sizes.update(vol=pool * opts.num_vol, near=pool * (opts.num_near + opts.num_sharp_near),
                     sharp_near=pool * opts.num_sharp_near)
    return sizes


def fps_prefix(arrays: dict, meta: dict, raw: dict, name: str, keep: int) -> None:
    """Replace ``name``'s points, normals and FPS order by their first ``keep`` rows."""
    if meta.get("fps_prefix_stored") is not True:
        raise ValueError(f"{raw.get('__url__')}: sample {raw.get('__key__')} stores {name} without the FPS "
                         f"prefix (written before preprocess-2): preprocess it again to reshard")
    points = load_npy(raw, f"{name}.npy")
    keep = min(keep, len(points))
    arrays[f"{name}.npy"] = np.ascontiguousarray(points[:keep])
    arrays[f"{name}_normal.npy"] = np.ascontiguousarray(load_npy(raw, f"{name}_normal.npy")[:keep])
    arrays[f"{name}_fps.npy"] = np.arange(min(keep, len(load_npy(raw, f"{name}_fps.npy"))), dtype=np.int32)


def random_subset(arrays: dict, raw: dict, name: str, keep: int, rng: np.random.Generator) -> None:
    """Replace query set ``name`` (points and SDF) by a uniform random subset of ``keep`` rows."""
    points, sdf = load_npy(raw, f"{name}.npy"), load_npy(raw, f"{name}_sdf.npy")
    idx = rng.permutation(len(points))[:keep]   # random order: any window is a random subset too
    arrays[f"{name}.npy"], arrays[f"{name}_sdf.npy"] = points[idx], sdf[idx]


def compact_sample(raw: dict, task: str, opts, pool: int, seed: int, options: dict) -> dict[str, Any]:
    """The compact sample (arrays, copied bytes and its json) for the shard writer."""
    meta = load_meta(raw)
    rng = seeded_rng(seed, int(hashlib.sha256(str(meta["id"]).encode()).hexdigest()[:8], 16))
    arrays: dict[str, Any] = {}
    sizes = pool_sizes(task, opts, pool)
    for name in ("surface", "sharp"):
        if f"{name}.npy" in raw:
            fps_prefix(arrays, meta, raw, name, sizes[name])
    for name in QUERY_SETS:
        if f"{name}.npy" in raw and name in sizes:
            random_subset(arrays, raw, name, sizes[name], rng)
    for key, data in raw.items():
        if not key.startswith("__") and key != "json" and key not in arrays:
            arrays[key] = data   # occ, latents, embeddings, views: as they are
    counts = {k[:-4]: int(len(v)) for k, v in arrays.items() if k.endswith(".npy") and k != "occ.npy"}
    provenance = {"from": Path(str(raw.get("__url__"))).name, "options": options, "pool": pool, "seed": seed,
                  "source_counts": meta.get("counts"), "source_checksums": meta.get(schema.CHECKSUM_KEY)}
    json_meta = {k: v for k, v in meta.items() if k != schema.CHECKSUM_KEY}
    return {**arrays, "json": {**json_meta, "counts": counts, "reshard": provenance}}


def source_samples(source: str, keys: tuple[str, ...], counter: ReadCounter, events: list) -> Iterator[dict]:
    plan = ReadPlan(keys)
    for shard in resolve_source(source):
        yield from shard_samples(shard.url, plan, events, shard.num_samples, counter)


def config_hash(options: dict, pool: int, seed: int) -> str:
    return hashlib.sha256(json.dumps([options, pool, seed], sort_keys=True).encode()).hexdigest()[:16]


def reshard(source: str, out: Path, task: str, options: dict, *, pool: int = 4, seed: int = 0,
            shard_max_samples: int = 1000, shard_max_bytes: int = 1_000_000_000) -> dict[str, int]:
    """Write compact shards of ``source`` for ``task`` + loader ``options`` into ``out``; returns counts."""
    if pool < 1:
        raise ValueError(f"reshard: pool must be >= 1, got {pool}")
    opts = parse_task_options(task, dict(options))
    keys = required_keys(task, opts) + optional_keys(task, opts)
    config = {"task": task, "options": asdict(opts), "pool": pool, "seed": seed, "source": str(source)}
    output = JobOutput(Path(out), 0, 1, config_hash(config["options"], pool, seed), config,
                       shard_max_samples, shard_max_bytes)
    done, counter, events = output.done_ids(), ReadCounter(), []
    written = skipped = 0
    for raw in source_samples(source, keys, counter, events):
        if str(json.loads(raw["json"]).get("id")) in done:
            skipped += 1
            continue
        output.write(compact_sample(raw, task, opts, pool, seed, config["options"]))
        written += 1
    output.finish()
    problems = [e for e in events if e[0] != "no_checksums"]   # unverified old shards are still usable
    return {"written": written, "skipped": skipped, "bytes_read": counter.bytes, "problems": len(problems),
            "unverified": sum(e[0] == "no_checksums" for e in events)}
