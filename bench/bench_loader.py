"""Loader throughput against plain sequential tar reading of the same shards, in the same run.

Reports, for one task configuration (default: the VecSet VAE base preset's inputs, batch 8):
  * baseline: plain ``tarfile`` streaming that reads every member's bytes (no grouping, no decoding);
  * loader read: the loader's shard reading alone (webdataset tar iteration + grouping by sample);
  * decode: turning those raw samples into the task's float32 batch (np.load, subsets, dequantise,
    collate), timed on samples already in memory; the target is decode < 0.5 x the read time;
  * end to end: make_loader(mode="train") with 0, 1 and 2 workers, samples/s and MB/s of shard bytes,
    and the ratio to the baseline.
All shards are read once before timing, so every number is from the page cache (a disk or object store
only makes the read side slower, which makes the decode ratio easier to meet).

Shards: --shards DIR, or (default) `shapeflow preprocess` of a few bundled meshes with the default
sampling counts (realistic sample sizes, ~4 MB) and a coarse watertight grid, written once to
--work and replicated to --min-mb of data.

Usage:  python bench/bench_loader.py [--shards DIR] [--batch-size 8] [--seconds 8] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from data_pipeline import make_loader  # noqa: E402
from data_pipeline.batches import collate, sample_arrays  # noqa: E402
from data_pipeline.loader import shard_samples  # noqa: E402
from data_pipeline.shard_order import seeded_rng  # noqa: E402

BENCH_MESHES = ["cow.obj", "fandisk.obj", "spot.obj", "suzanne.obj", "multibody.stl", "featuretype.STL"]
BENCH_CONFIG = "watertight: {resolution: 64, coarse_resolution: 16}\nshard_max_samples: 3\n"
# VecSet VAE base preset (configs/vecset_vae_base.yaml): 1024 uniform + 1024 sharp latent tokens,
# the trainer asks for 4 surface points per token; batch 8 per rank.
VAE_BASE = dict(task="vae", num_surface=4096, num_sharp=4096, num_vol=1024, num_near=1024,
                token_cutoffs=[256, 512, 1024, 2048])


def build_shards(work: Path, min_mb: float) -> Path:
    """Preprocess the bench meshes once (cached in ``work``), then replicate shards up to ``min_mb``."""
    from trainer import cli
    base = work / "base"
    if not (base / "manifest.json").exists():
        config = work / "bench.yaml"
        work.mkdir(parents=True, exist_ok=True)
        config.write_text(BENCH_CONFIG)
        inputs = [str(REPO / "assets/meshes" / m) for m in BENCH_MESHES]
        rc = cli.main(["preprocess", *inputs, "--out", str(base), "--config", str(config), "--workers", "2"])
        if rc != 0:
            raise SystemExit(f"bench_loader: preprocessing failed (exit {rc})")
    tars = sorted(base.glob("*.tar"))
    size_mb = sum(t.stat().st_size for t in tars) / 1e6
    copies = max(1, int(np.ceil(min_mb / size_mb)))
    out = work / f"x{copies}"
    if not out.exists():
        out.mkdir()
        for c, t in itertools.product(range(copies), tars):
            shutil.copy(t, out / f"copy{c:02d}-{t.name}")  # real copies: hard links would share page cache
    return out


def tar_baseline(paths: list[Path]) -> tuple[float, int]:
    """Seconds and bytes for plain sequential streaming of every member."""
    start, total = time.perf_counter(), 0
    for path in paths:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if member.isfile():
                    total += len(tar.extractfile(member).read())
    return time.perf_counter() - start, total


def loader_read(paths: list[Path], loader) -> tuple[float, list[dict]]:
    start, raws = time.perf_counter(), []
    for path in paths:
        raws += list(shard_samples(str(path), loader.plan, []))
    return time.perf_counter() - start, raws


def decode(raws: list[dict], loader, batch_size: int) -> float:
    plan = loader.plan
    start = time.perf_counter()
    for i in range(0, len(raws) - batch_size + 1, batch_size):
        items = [sample_arrays(r, plan.task, plan.options, seeded_rng(0, i, j)) for j, r in enumerate(raws[i:i + batch_size])]
        collate(items, [True] * len(items))
    return time.perf_counter() - start


def end_to_end(paths: list[Path], options: dict, batch_size: int, workers: int, seconds: float) -> tuple[float, int]:
    """Samples/s of make_loader in training mode, after two warm-up batches (worker start-up excluded)."""
    loader = make_loader([str(p) for p in paths], batch_size=batch_size, mode="train", seed=0,
                         num_workers=workers, shuffle_buffer=16, **options)
    it = iter(loader)
    next(it), next(it)
    start, samples = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        samples += len(next(it)["id"])
    return samples / (time.perf_counter() - start), samples


def best(fn, repeats):
    results = [fn() for _ in range(repeats)]
    return min(results, key=lambda r: r[0] if isinstance(r, tuple) else r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, help="existing shard directory (default: build one)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/shapeflow_bench_loader"))
    parser.add_argument("--min-mb", type=float, default=150.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per end-to-end run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    shard_dir = args.shards or build_shards(args.work, args.min_mb)
    paths = sorted(shard_dir.glob("*.tar"))
    probe = make_loader([str(p) for p in paths], batch_size=args.batch_size, mode="train", seed=0, **VAE_BASE)
    tar_baseline(paths)  # warm the page cache

    tar_s, nbytes = best(lambda: tar_baseline(paths), args.repeats)
    read_s, raws = best(lambda: loader_read(paths, probe), args.repeats)
    decode_s = best(lambda: decode(raws, probe, args.batch_size), args.repeats)
    n, mb = len(raws), nbytes / 1e6
    decoded = n - n % args.batch_size
    mb_per_sample = mb / n
    res = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores", "shards": len(paths), "samples": n, "MB": round(mb, 1),
        "MB_per_sample": round(mb_per_sample, 2), "batch_size": args.batch_size, "options": VAE_BASE,
        "tar_samples_per_s": n / tar_s, "tar_MB_per_s": mb / tar_s,
        "loader_read_samples_per_s": n / read_s,
        "decode_samples_per_s": decoded / decode_s,
        "decode_over_tar_read": (decode_s / decoded) / (tar_s / n),
        "decode_over_loader_read": (decode_s / decoded) / (read_s / n),
    }
    print(f"{len(paths)} shards, {n} samples, {mb:.0f} MB ({mb_per_sample:.2f} MB/sample), batch {args.batch_size}")
    print(f"plain tar read      {n / tar_s:8.1f} samples/s {mb / tar_s:8.1f} MB/s")
    print(f"loader read only    {n / read_s:8.1f} samples/s {mb / read_s:8.1f} MB/s")
    print(f"decode + collate    {decoded / decode_s:8.1f} samples/s   decode/tar-read time "
          f"{res['decode_over_tar_read']:.2f}, decode/loader-read time {res['decode_over_loader_read']:.2f} "
          f"(target < 0.5)")
    for workers in (0, 1, 2):
        rate, _ = end_to_end(paths, VAE_BASE, args.batch_size, workers, args.seconds)
        res[f"workers{workers}_samples_per_s"] = rate
        res[f"workers{workers}_over_tar"] = rate / (n / tar_s)
        print(f"loader, {workers} workers  {rate:8.1f} samples/s {rate * mb_per_sample:8.1f} MB/s   "
              f"ratio to plain tar {rate / (n / tar_s):.2f}   {rate / args.batch_size:6.1f} batches/s")
    top = max(res[f"workers{w}_samples_per_s"] for w in (0, 1, 2))
    for batch in (8, 16, 32):
        # a training step consumes `batch` samples per rank; 10x headroom needs step time >= this
        res[f"min_step_s_for_10x_at_batch{batch}"] = 10 * batch / top
        print(f"10x headroom at batch {batch:2d} per rank holds for steps slower than {10 * batch / top:.3f} s")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
