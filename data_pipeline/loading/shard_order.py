"""Which shards (or parts of shards) each loader stream reads, and in what order.

A *stream* is one (rank, dataloader worker) pair; its global index is
``rank * workers + worker`` where ``workers = max(1, num_workers)``.
Everything here is a pure function of its arguments (no global RNG, no pid or
time), so every rank computes the same plan without communication and a
restarted job recomputes exactly the plan it had.

Training plan (per epoch): the shard list is split into *units*. Normally a unit
is a whole shard. When there are fewer shards than streams, shards are split
into interleaved parts (part ``p`` of ``k`` holds the samples whose index inside
the shard is ``p mod k``; larger shards get more parts, see
:func:`parts_per_shard`), so no stream is left idle and no sample is
duplicated; the price is that a shard split in ``k`` parts has its bytes read
``k`` times (decoding still happens once per sample). The units are permuted with an
RNG seeded by (seed, epoch) and dealt round-robin: stream ``g`` gets units
``perm[g::streams]``. Streams are therefore disjoint within an epoch and their
union is the whole data set.

Evaluation plan: the samples, in shard-list order, get global indices
``0..N-1``; stream ``g`` owns the contiguous range
``[g*N // S, (g+1)*N // S)``, i.e. a few (shard, start, stop) segments. Every
sample belongs to exactly one stream, stream sizes differ by at most one, and
only shards at range boundaries are opened by two streams.

Sources: a directory with ``manifest.json`` (or a manifest file), a brace
pattern (``shards/train-{000000..000009}.tar``), a list of paths/URLs, and any
URL webdataset can open (``pipe:aws s3 cp s3://b/x.tar -``, ``http://``...).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import braceexpand
import numpy as np

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Shard:
    url: str                  # local path or any URL gopen understands (pipe:, http:, ...)
    num_samples: int | None   # from the manifest; None when unknown


@dataclass(frozen=True)
class Unit:
    """A training work unit: part ``part`` of ``num_parts`` of shard ``shard``."""
    shard: int
    part: int = 0
    num_parts: int = 1

    def owns(self, index_in_shard: int) -> bool:
        return index_in_shard % self.num_parts == self.part


@dataclass(frozen=True)
class Segment:
    """An evaluation work unit: samples ``[start, stop)`` of shard ``shard``."""
    shard: int
    start: int
    stop: int


# ---------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------

def is_local(url: str) -> bool:
    """A path on this machine (not a URL or a ``pipe:`` command)."""
    return "://" not in url and not url.startswith("pipe:")


def _expand(item: str | os.PathLike) -> list[str]:
    text = os.fspath(item)
    if is_local(text) and os.path.exists(text):
        return [text]  # a real path may legitimately contain braces
    return list(braceexpand.braceexpand(text))


def _manifest_entries(manifest: dict, path: Path) -> list[dict]:
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list):
        raise ValueError(f"{path}: manifest has no 'shards' list")
    return shards


def _entry_name_and_count(entry: dict, path: Path) -> tuple[str, int | None]:
    name = next((entry[k] for k in ("name", "path", "file", "url") if k in entry), None)
    if not isinstance(name, str):
        raise ValueError(f"{path}: shard entry {entry!r} has no name")
    count = next((entry[k] for k in ("num_samples", "samples", "count") if k in entry), None)
    if count is not None and (not isinstance(count, int) or count < 0):
        raise ValueError(f"{path}: shard {name} has an invalid sample count {count!r}")
    return name, count


def manifest_paths(directory: Path) -> list[Path]:
    """The manifest files to read in a shard directory.

    `shapeflow preprocess` writes one part per job (``manifest-j{I}of{J}.json``, a SLURM array
    writes several) and a merged view ``manifest.json`` that may lag behind the parts; the parts
    are the truth, read in sorted order (the order of the merged view). A directory without parts
    uses ``manifest.json``.
    """
    parts = sorted(directory.glob("manifest-*.json"))
    main = directory / MANIFEST_NAME
    return parts or ([main] if main.exists() else [])


def read_manifest(path: str | os.PathLike) -> list[Shard]:
    """Shards listed by one manifest file (paths resolved beside the manifest)."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: manifest is not valid JSON ({err})") from err
    shards = []
    for entry in _manifest_entries(manifest, path):
        name, count = _entry_name_and_count(entry, path)
        url = name if not is_local(name) or os.path.isabs(name) else str(path.parent / name)
        shards.append(Shard(url, count))
    return shards


def read_manifest_dir(directory: str | os.PathLike) -> list[Shard]:
    directory = Path(directory)
    paths = manifest_paths(directory)
    if not paths:
        raise FileNotFoundError(f"{directory}: no {MANIFEST_NAME} (is this a shard directory written by "
                                f"`shapeflow preprocess`?)")
    seen: dict[str, Shard] = {}
    for path in paths:
        for shard in read_manifest(path):
            seen.setdefault(shard.url, shard)
    if not seen:
        raise ValueError(f"{directory}: the manifest lists no shards")
    return list(seen.values())


def _counts_from_sibling_manifest(urls: list[str]) -> dict[str, int | None]:
    """Sample counts for local shard paths whose directory holds a manifest."""
    counts: dict[str, int | None] = {}
    for directory in {str(Path(u).parent) for u in urls if is_local(u)}:
        if manifest_paths(Path(directory)):
            for shard in read_manifest_dir(directory):
                counts[os.path.abspath(shard.url)] = shard.num_samples
    return {u: counts.get(os.path.abspath(u)) if is_local(u) else None for u in urls}


def resolve_source(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Shard]:
    """Turn a loader ``source`` into the ordered shard list (the list order defines shard identity)."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if is_local(text) and os.path.isdir(text):
            shards = read_manifest_dir(text)
            _check_local_files_exist([s.url for s in shards], text)
            return shards
        if is_local(text) and text.endswith(".json") and os.path.isfile(text):
            shards = read_manifest(text)
            _check_local_files_exist([s.url for s in shards], text)
            return shards
        items: Sequence[str | os.PathLike] = [text]
    else:
        items = list(source)
    urls = [url for item in items for url in _expand(item)]
    if not urls:
        raise ValueError(f"loader source {source!r} names no shards")
    _check_local_files_exist(urls, "loader source")
    counts = _counts_from_sibling_manifest(urls)
    return [Shard(u, counts[u]) for u in urls]


def _check_local_files_exist(urls: list[str], where: str) -> None:
    for url in urls:
        if is_local(url) and not os.path.exists(url):
            raise FileNotFoundError(f"{where}: shard {url} does not exist")


def fingerprint(shards: Sequence[Shard]) -> str:
    """Short hash of the shard list (names and counts): a cursor only fits the list it was made for."""
    blob = json.dumps([[os.path.basename(s.url), s.num_samples] for s in shards]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------
# deterministic plans
# ---------------------------------------------------------------------------

def seeded_rng(*words: int) -> np.random.Generator:
    """A numpy Generator that depends only on ``words`` (non-negative ints)."""
    return np.random.default_rng(np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words]))


# tags keep the RNG streams of different purposes independent
TAG_SHARD_ORDER, TAG_SHUFFLE, TAG_SAMPLE, TAG_BATCH = 1, 2, 3, 4


def parts_per_shard(counts: Sequence[int | None], num_streams: int) -> list[int]:
    """How many interleaved parts each shard is split into so that every stream gets a unit.

    1 for every shard when there are at least as many shards as streams. Otherwise
    parts go one at a time to the shard with the most samples per part (never
    more parts than samples, so no part is empty); without manifest counts every
    shard gets ``ceil(streams / shards)`` parts.
    """
    n = len(counts)
    if n >= num_streams:
        return [1] * n
    if any(c is None for c in counts):
        return [math.ceil(num_streams / n)] * n
    if sum(counts) < num_streams:
        raise ValueError(f"training needs at least one sample per stream: {sum(counts)} samples for "
                         f"{num_streams} streams (ranks x dataloader workers); use fewer workers")
    parts = [1] * n
    while sum(parts) < num_streams:
        best = max((i for i in range(n) if parts[i] < counts[i]), key=lambda i: counts[i] / parts[i])
        parts[best] += 1
    return parts


def training_units(counts: Sequence[int | None], num_streams: int, seed: int, epoch: int) -> list[list[Unit]]:
    """Units of ``epoch`` for every stream: disjoint, covering, a pure function of the arguments."""
    if not counts:
        raise ValueError("no shards to read")
    parts = parts_per_shard(counts, num_streams)
    units = [Unit(shard, part, k) for shard, k in enumerate(parts) for part in range(k)]
    order = seeded_rng(seed, epoch, TAG_SHARD_ORDER).permutation(len(units))
    return [[units[i] for i in order[g::num_streams]] for g in range(num_streams)]


# ---------------------------------------------------------------------------
# mixing inside a training stream (also replayed without data by loading.resize)
# ---------------------------------------------------------------------------

def buffered_shuffle(samples: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle buffer: keep ``size`` samples, emit a random one for each new arrival, drain at the end."""
    buffer: list = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(len(buffer)))
        yield buffer[j]
        buffer[j] = sample
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def interleave(sources: Iterator[Iterator], width: int) -> Iterator:
    """Round-robin over ``width`` open sources at a time; a finished source is replaced by the next one."""
    pending = iter(sources)
    active = list(itertools.islice(pending, width))
    i = 0
    while active:
        i %= len(active)
        try:
            yield next(active[i])
            i += 1
        except StopIteration:
            replacement = next(pending, None)
            if replacement is None:
                active.pop(i)
            else:
                active[i] = replacement


def eval_segments(counts: Sequence[int], num_streams: int) -> list[list[Segment]]:
    """Contiguous, balanced split of all samples (in shard-list order) over the streams."""
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(int)  # shard i holds [bounds[i], bounds[i+1])
    total = int(bounds[-1])
    plans = []
    for g in range(num_streams):
        lo, hi = g * total // num_streams, (g + 1) * total // num_streams
        segments = []
        for shard, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            start, stop = max(lo, a), min(hi, b)
            if start < stop:
                segments.append(Segment(shard, int(start - a), int(stop - a)))
        plans.append(segments)
    return plans


def eval_batches_per_stream(total_samples: int, num_streams: int, batch_size: int) -> int:
    """Every stream yields this many batches (padding where it has fewer samples)."""
    largest_stream = math.ceil(total_samples / num_streams)
    return math.ceil(largest_stream / batch_size)
