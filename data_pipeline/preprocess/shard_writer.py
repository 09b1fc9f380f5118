"""Shards, manifests and failure logs of one preprocessing job in an output directory.

Several jobs (a SLURM array) may write into the same directory at once, so every file a job writes
carries its job tag ``j{I:05d}of{J:05d}``:

* shards ``shard-{tag}-{seq:06d}.tar``: written as ``.tar.tmp`` and renamed when complete, so a
  shard under its final name is never half-written;
* manifest part ``manifest-{tag}.json``: this job's shards with their sample counts and ids;
* failure part ``failures-{tag}.jsonl``: this job's rejected inputs in its latest run.

``manifest.json`` and ``failures.jsonl`` are merged views of all parts, rewritten under a file lock
after every shard and at the end of each job. Readers may use either (the loader merges the parts
itself, so a view is never needed to be current).
"""
from __future__ import annotations

import fcntl
import json
import os
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import webdataset as wds

from data_pipeline import schema
from data_pipeline.preprocess.pipeline import encode_npy

MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
LOCK = ".preprocess.lock"


def job_tag(job_index: int, num_jobs: int) -> str:
    return f"j{job_index:05d}of{num_jobs:05d}"


def encode_sample(sample: dict) -> dict[str, bytes]:
    """Arrays -> .npy bytes, json dict -> utf-8, bytes (PNG views) as they are; ``__key__`` is the mesh id.

    The json gets ``xxh3_64``: member name -> checksum of that member's bytes (schema.checksum), for every other member the
    sample has (whatever members a schema version adds), so readers can detect a damaged payload.
    """
    encoded: dict = {"__key__": sample["json"]["id"]}
    for key, value in sample.items():
        if key != "json":
            encoded[key] = value if isinstance(value, bytes) else encode_npy(value)
    checksums = {key: schema.checksum(data) for key, data in encoded.items() if key != "__key__"}
    encoded["json"] = json.dumps({**sample["json"], schema.CHECKSUM_KEY: checksums}).encode()
    return encoded


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@contextmanager
def directory_lock(out: Path):
    with open(out / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tar_ids(path: Path) -> list[str]:
    """Sample keys of a complete shard, read with plain tarfile."""
    with tarfile.open(path) as tar:
        return sorted({member.name.split(".", 1)[0] for member in tar.getmembers()})


class JobOutput:
    """The files of one job (``job_index`` of ``num_jobs``) in ``out``."""

    def __init__(self, out: Path, job_index: int, num_jobs: int, config_hash: str, config: dict,
                 max_samples: int, max_bytes: int) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tag = job_tag(job_index, num_jobs)
        self.config_hash, self.config = config_hash, config
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.part_path = self.out / f"manifest-{self.tag}.json"
        self.failure_path = self.out / f"failures-{self.tag}.jsonl"
        self._check_config()
        self.shards = self._load_part()
        for stale in self.out.glob(f"shard-{self.tag}-*.tar.tmp"):   # a crashed run's unfinished shard
            stale.unlink()
        self._adopt_unlisted_shards()
        self.failure_path.write_text("")
        self._writer = None
        self._current: dict | None = None

    # -- resume ------------------------------------------------------------------------------
    def _check_config(self) -> None:
        for part in sorted(self.out.glob("manifest-j*.json")):
            found = json.loads(part.read_text()).get("config_hash")
            if found != self.config_hash:
                raise ValueError(f"{self.out} holds shards written with another config (hash {found} in "
                                 f"{part.name}, this run has {self.config_hash}): use the same config or a new --out")

    def _load_part(self) -> list[dict]:
        if not self.part_path.exists():
            return []
        shards = json.loads(self.part_path.read_text())["shards"]
        return [s for s in shards if (self.out / s["name"]).exists()]

    def _adopt_unlisted_shards(self) -> None:
        """A job killed between renaming a shard and updating its manifest part left a complete shard."""
        listed = {s["name"] for s in self.shards}
        for path in sorted(self.out.glob(f"shard-{self.tag}-*.tar")):
            if path.name not in listed:
                ids = tar_ids(path)
                self.shards.append({"name": path.name, "num_samples": len(ids), "bytes": path.stat().st_size,
                                    "ids": ids})
        self._save_part()

    def done_ids(self) -> set[str]:
        """Ids in complete shards of every job (a mesh is never written twice, whichever job did it)."""
        ids: set[str] = set()
        for part in self.out.glob("manifest-j*.json"):
            for shard in json.loads(part.read_text())["shards"]:
                if (self.out / shard["name"]).exists():
                    ids.update(shard["ids"])
        ids.update(i for s in self.shards for i in s["ids"])
        return ids

    # -- writing -----------------------------------------------------------------------------
    def write(self, sample: dict) -> None:
        if self._writer is None:
            self._open()
        encoded = encode_sample(sample)
        self._writer.write(encoded)
        self._current["ids"].append(encoded["__key__"])
        self._current["bytes"] += sum(len(v) for k, v in encoded.items() if k != "__key__")
        if len(self._current["ids"]) >= self.max_samples or self._current["bytes"] >= self.max_bytes:
            self._close_shard()

    def fail(self, source: str, path: str, reason: str) -> None:
        with open(self.failure_path, "a") as handle:
            handle.write(json.dumps({"source": source, "path": path, "reason": reason}) + "\n")

    def finish(self) -> None:
        if self._writer is not None:
            self._close_shard()
        self._merge_views()

    def _open(self) -> None:
        seq = 1 + max((int(p.name.split("-")[-1].split(".")[0]) for p in self.out.glob(f"shard-{self.tag}-*.tar")),
                      default=-1)
        name = f"shard-{self.tag}-{seq:06d}.tar"
        self._tmp = self.out / (name + ".tmp")
        self._stream = open(self._tmp, "wb")
        # An integer mtime: a float one (webdataset's default, time.time()) makes tarfile add a PAX header
        # to every member, which doubles the header parsing a reader pays per member.
        self._writer = wds.TarWriter(self._stream, mtime=int(time.time()))
        self._current = {"name": name, "num_samples": 0, "bytes": 0, "ids": []}

    def _close_shard(self) -> None:
        self._writer.close()          # also closes the stream
        os.replace(self._tmp, self.out / self._current["name"])
        self._current["num_samples"] = len(self._current["ids"])
        self.shards.append(self._current)
        self._writer, self._current = None, None
        self._save_part()
        self._merge_views()

    def _save_part(self) -> None:
        _write_json_atomic(self.part_path, {
            "schema_version": schema.SCHEMA_VERSION, "config_hash": self.config_hash, "config": self.config,
            "job": self.tag, "shards": self.shards,
            "totals": {"shards": len(self.shards), "samples": sum(s["num_samples"] for s in self.shards)},
        })

    def _merge_views(self) -> None:
        with directory_lock(self.out):
            write_merged_views(self.out)


def write_merged_views(out: Path) -> dict:
    """Rewrite manifest.json and failures.jsonl from every job's parts; returns the manifest."""
    shards, hashes, jobs = [], set(), []
    for part_path in sorted(out.glob("manifest-j*.json")):
        part = json.loads(part_path.read_text())
        hashes.add(part["config_hash"])
        jobs.append(part["job"])
        shards += [{k: s[k] for k in ("name", "num_samples", "bytes")} for s in part["shards"]
                   if (out / s["name"]).exists()]
    failures = []
    for part_path in sorted(out.glob("failures-j*.jsonl")):
        failures += [line for line in part_path.read_text().splitlines() if line.strip()]
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "config_hash": sorted(hashes)[0] if len(hashes) == 1 else sorted(hashes),
        "jobs": jobs,
        "shards": shards,
        "totals": {"shards": len(shards), "samples": sum(s["num_samples"] for s in shards),
                   "bytes": sum(s["bytes"] for s in shards), "failures": len(failures)},
    }
    _write_json_atomic(out / MANIFEST, manifest)
    tmp = out / (FAILURES + f".tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in failures))
    os.replace(tmp, out / FAILURES)
    return manifest
