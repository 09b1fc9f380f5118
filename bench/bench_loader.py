"""Loader throughput against plain sequential tar reading of the same shards, in the same run.

Reports, for the inputs of two base presets (VecSet VAE, batch 8; VecSet DiT, batch 16):
  * baseline: plain ``tarfile`` reading every member's bytes in order (no grouping, no decoding);
  * loader read: the loader's shard reading alone (webdataset tar iteration + grouping by sample);
  * decode: turning those raw samples into the task's float32 batch (np.load, subsets, dequantise,
    collate), timed on samples already in memory; the target is decode < 0.5 x the read time;
  * end to end: make_loader(mode="train") with 0, 1 and 2 workers, samples/s and MB/s of shard bytes,
    and the ratio to the baseline (both wall-clock, the baseline measured right before each run).
The three stages are timed in process CPU time (user + system), which a shared CPU disturbs less.
All shards are read once before timing, so every number is from the page cache (a disk or object store
only makes the read side slower, which makes the decode ratio easier to meet).

Shards: --shards DIR, or (default) `shapeflow preprocess` of a few bundled meshes with the default
sampling counts (realistic sample sizes, ~4 MB) and a coarse watertight grid, written once to
--work and replicated to --min-mb of data.

Usage:  python bench/bench_loader.py [--shards DIR] [--seconds 6] [--repeats 5] [--json out.json]
                                    [--step-seconds vecset_vae_base=74 ...]
"""
from __future__ import annotations

import argparse
import dataclasses
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
from data_pipeline.loading.batches import collate, sample_arrays  # noqa: E402
from data_pipeline.loading.shard_order import seeded_rng  # noqa: E402
from data_pipeline.loading.shard_reader import shard_samples  # noqa: E402
from data_pipeline.preprocess.pipeline import PIPELINE_VERSION  # noqa: E402

BENCH_MESHES = ["cow.obj", "fandisk.obj", "spot.obj", "suzanne.obj", "multibody.stl", "featuretype.STL"]
BENCH_CONFIG = "watertight: {resolution: 64, coarse_resolution: 16}\nshard_max_samples: 3\n"
# Base presets (configs/*_base.yaml): VecSet VAE with 1024 uniform + 1024 sharp latent tokens and
# 4 input points per token (the trainer's default), batch 8 per rank; VecSet DiT on a frozen VAE
# (surface input only), batch 16 per rank.
VAE_BASE = dict(task="vae", num_surface=4096, num_sharp=4096, num_vol=1024, num_near=1024,
                token_cutoffs=[256, 512, 1024, 2048], num_fps=1024, num_sharp_fps=1024)
DIT_BASE = dict(task="dit", num_surface=4096, num_sharp=4096)
# The VAE trainer resamples points at every read (fresh subset + random-start FPS of the query tokens);
# the fixed profile is the loader without it (a fixed stored FPS prefix), for comparison.
PROFILES = {"vecset_vae_base": (VAE_BASE, 8), "vecset_vae_base_fixed": ({**VAE_BASE, "resample": False}, 8),
            "vecset_dit_base": (DIT_BASE, 16)}


def build_shards(work: Path, min_mb: float) -> Path:
    """Preprocess the bench meshes once (cached in ``work``), then replicate shards up to ``min_mb``."""
    from trainer import commands as cli
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
    """Seconds and bytes for plain sequential reading of every member (tarfile's fastest mode, with seeks)."""
    start, total = time.process_time(), 0
    for path in paths:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    total += len(tar.extractfile(member).read())
    return time.process_time() - start, total


def loader_read(paths: list[Path], loader, verify: bool = True) -> tuple[float, list[dict]]:
    """CPU seconds of the loader's shard reading (with or without the checksum check of every member read)."""
    plan = dataclasses.replace(loader.plan, verify=verify)
    start, raws = time.process_time(), []
    for path in paths:
        raws += list(shard_samples(str(path), plan, []))
    return time.process_time() - start, raws


def decode(raws: list[dict], loader, batch_size: int) -> float:
    plan = loader.plan
    start = time.process_time()
    for i in range(0, len(raws) - batch_size + 1, batch_size):
        items = [sample_arrays(r, plan.task, plan.options, seeded_rng(0, i, j)) for j, r in enumerate(raws[i:i + batch_size])]
        collate(items, [True] * len(items))
    return time.process_time() - start


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


def wall(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def stage_times(paths: list[Path], probe, batch_size: int, repeats: int) -> dict:
    """Best-of-``repeats`` CPU seconds (user + system, so page-cache copies count) of the three stages.

    The CPU is shared: process time is what this process itself spent, and measuring the stages back to
    back in every repeat keeps a busy moment (cache pollution) from landing on one side of a ratio only.
    """
    tar_s = read_s = unverified_s = decode_s = float("inf")
    for _ in range(repeats):
        t, nbytes = tar_baseline(paths)
        r, raws = loader_read(paths, probe)
        unverified_s = min(unverified_s, loader_read(paths, probe, verify=False)[0])
        tar_s, read_s = min(tar_s, t), min(read_s, r)
        decode_s = min(decode_s, decode(raws, probe, batch_size))
    return {"tar_s": tar_s, "read_s": read_s, "unverified_read_s": unverified_s, "decode_s": decode_s,
            "bytes": nbytes, "samples": len(raws), "decoded": len(raws) - len(raws) % batch_size}


def bench_profile(name: str, options: dict, batch_size: int, paths: list[Path], args) -> dict:
    probe = make_loader([str(p) for p in paths], batch_size=batch_size, mode="train", seed=0, **options)
    st = stage_times(paths, probe, batch_size, args.repeats)
    n, mb = st["samples"], st["bytes"] / 1e6
    mb_per_sample = mb / n
    decode_per_sample = st["decode_s"] / st["decoded"]
    res = {"options": options, "batch_size": batch_size,
           "tar_samples_per_s": n / st["tar_s"], "tar_MB_per_s": mb / st["tar_s"],
           "loader_read_samples_per_s": n / st["read_s"], "decode_samples_per_s": 1 / decode_per_sample,
           "decode_over_tar_read": decode_per_sample / (st["tar_s"] / n),
           "decode_over_loader_read": decode_per_sample / (st["read_s"] / n),
           "verify_cost_of_read_plus_decode": (st["read_s"] - st["unverified_read_s"]) /
                                              (st["unverified_read_s"] + st["decode_s"] * n / st["decoded"])}
    print(f"\n== {name}: batch {batch_size}, options {options}")
    print(f"plain tar read      {n / st['tar_s']:8.1f} samples/s {mb / st['tar_s']:8.1f} MB/s")
    print(f"loader read only    {n / st['read_s']:8.1f} samples/s {mb / st['read_s']:8.1f} MB/s "
          f"(shard bytes covered; members the task does not use are skipped)")
    print(f"decode + collate    {1 / decode_per_sample:8.1f} samples/s   decode/tar-read time "
          f"{res['decode_over_tar_read']:.2f}, decode/loader-read time {res['decode_over_loader_read']:.2f} "
          f"(target < 0.5)")
    print(f"checksum verification (XXH3 checksum of every member read, on by default): read {st['read_s']:.3f} s vs "
          f"{st['unverified_read_s']:.3f} s unverified CPU, {100 * res['verify_cost_of_read_plus_decode']:.1f}% "
          f"of read + decode")
    for workers in (0, 1, 2):
        tar_rate = max(n / wall(tar_baseline, paths) for _ in range(args.repeats))  # same conditions, just before
        rate, _ = end_to_end(paths, options, batch_size, workers, args.seconds)
        res[f"workers{workers}_samples_per_s"] = rate
        res[f"workers{workers}_over_tar"] = rate / tar_rate
        print(f"loader, {workers} workers  {rate:8.1f} samples/s {rate * mb_per_sample:8.1f} MB/s   "
              f"ratio to plain tar {rate / tar_rate:.2f}   {rate / batch_size:6.1f} batches/s")
    top = max(res[f"workers{w}_samples_per_s"] for w in (0, 1, 2))
    res["min_step_s_for_10x"] = 10 * batch_size / top
    print(f"10x headroom at batch {batch_size} per rank holds for training steps slower than "
          f"{10 * batch_size / top:.3f} s")
    step_s = args.step_seconds.get(name.removesuffix("_fixed"))
    if step_s:
        res.update(headroom_at(step_s, batch_size, res["workers0_samples_per_s"]))
    return res


def headroom_at(step_s: float, batch_size: int, per_process_rate: float) -> dict:
    """The loader's headroom over a measured training step (one loader process), and the loader
    processes per rank that give 10x (the 0-worker rate is read + decode on one core)."""
    headroom = step_s * per_process_rate / batch_size
    processes = int(np.ceil(10 / headroom))
    print(f"against a {step_s:g} s step: {headroom:.1f}x headroom per loader process; "
          f"10x needs {processes} loader process{'es' if processes > 1 else ''} per rank")
    return {"step_s": step_s, "headroom_per_process": headroom, "processes_for_10x": processes}


def step_seconds(text: str) -> tuple[str, float]:
    """PROFILE=SECONDS, e.g. vecset_vae_base=0.017 (a measured step time at the profile's batch size)."""
    name, _, value = text.partition("=")
    if name not in PROFILES or not value:
        raise argparse.ArgumentTypeError(f"want PROFILE=SECONDS with PROFILE one of {', '.join(PROFILES)}")
    return name, float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, help="existing shard directory (default: build one)")
    # the cache is per pipeline version: shards of an older layout would measure the old decoder path
    parser.add_argument("--work", type=Path, default=Path(f"/tmp/shapeflow_bench_loader-{PIPELINE_VERSION}"))
    parser.add_argument("--min-mb", type=float, default=150.0)
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per end-to-end run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--step-seconds", type=step_seconds, action="append", default=[],
                        metavar="PROFILE=S", help="a measured training step time at the profile's batch size "
                        "(e.g. from `shapeflow train`'s samples/s): prints the headroom and the loader "
                        "processes per rank that give 10x; vecset_vae_base also applies to the _fixed profile")
    args = parser.parse_args()
    args.step_seconds = dict(args.step_seconds)

    shard_dir = args.shards or build_shards(args.work, args.min_mb)
    paths = sorted(shard_dir.glob("*.tar"))
    tar_baseline(paths)  # warm the page cache
    total_mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"{len(paths)} shards, {total_mb:.0f} MB, from the page cache; {platform.machine()}, "
          f"{os.cpu_count()} cores")
    results = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "shards": len(paths), "MB": round(total_mb, 1)}
    for name, (options, batch) in PROFILES.items():
        results[name] = bench_profile(name, options, batch, paths, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
