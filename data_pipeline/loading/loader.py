"""Streaming loader: WebDataset shards -> collated batches on every rank, shuffled, balanced, resumable.

Use :func:`make_loader`; the batch layout and every option are documented in
docs/loader.md. How it works, in the order data flows:

1. :mod:`data_pipeline.loading.shard_order` turns the source into a shard list and each
   *stream* (one per rank x dataloader worker) into its work: whole shards (or
   interleaved parts of shards) permuted by (seed, epoch) in training mode, a
   contiguous balanced range of samples in evaluation mode.
2. Each shard is read into raw samples (:mod:`data_pipeline.loading.shard_reader`): local ``.tar`` files with seeks (members
   the task does not use are skipped), everything else (``pipe:``, http, object
   stores; optional file cache) through webdataset's openers and tar iterator;
   webdataset groups the members by key. A read error or a missing end-of-archive
   marker ends that shard: the samples before it are kept, the last (possibly
   incomplete) one is dropped, a ``corrupt_shard`` event names the shard, and the
   stream goes on.
3. Training mode: each stream reads a few of its shards in turns, and a shuffle
   buffer with an RNG seeded by (seed, epoch, stream) mixes the raw (undecoded)
   samples; the stream loops over epochs forever. Evaluation mode: no shuffle;
   every stream yields exactly the same number of batches, the last ones padded
   with repeated samples marked ``valid == False``, so all ranks finish together.
4. Surviving samples are decoded by :mod:`data_pipeline.loading.batches` (per-sample
   randomness seeded by (seed, epoch, sample id)) and collated.

Cursor: each stream's position is (epoch, raw samples consumed in that epoch,
batches yielded). The sequence of raw samples of a stream in an epoch is a pure
function of (seed, epoch, rank, worker), so restoring a cursor re-reads that
epoch's shards and skips exactly the consumed samples without decoding them:
nothing is replayed or skipped (the cost is re-reading the bytes already
consumed in the current epoch). Every batch carries its stream's position;
the main process records it when the batch is handed to the caller, so
batches still in the dataloader's prefetch queue are not counted and are
produced again after a restore.
"""
from __future__ import annotations

import os
import random
import re
import warnings
import weakref
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.loading.batches import (
    BadSample,
    collate,
    draw_token_count,
    optional_keys,
    parse_task_options,
    required_keys,
    sample_arrays,
)
from data_pipeline.loading.resize import OPEN_SHARDS, Skip, done_set, history_from_gathered, replayed
from data_pipeline.loading.shard_order import (
    TAG_BATCH,
    TAG_SAMPLE,
    TAG_SHUFFLE,
    Shard,
    buffered_shuffle,
    eval_batches_per_stream,
    eval_segments,
    fingerprint,
    interleave,
    is_local,
    parts_per_shard,
    resolve_source,
    seeded_rng,
    training_units,
)
from data_pipeline.loading.shard_reader import ReadCounter, count_samples, shard_samples

MODES = ("train", "eval")
CURSOR_FORMAT = 1
MAX_EMPTY_EPOCHS = 3     # a training stream that reads nothing this many epochs in a row raises
MAX_LOGGED_FAILURES = 100


class NoReadableData(RuntimeError):
    """A training stream read no usable sample for MAX_EMPTY_EPOCHS epochs; the message names its
    shards and what was wrong with them (one line)."""


class LoaderWarning(UserWarning):
    """A shard or sample was skipped (the loader goes on; see ``loader.stats``)."""


@dataclass
class Plan:
    """Everything a stream needs (picklable: it travels to dataloader workers)."""
    shards: list[Shard]
    task: str
    options: Any
    batch_size: int
    mode: str
    seed: int
    rank: int
    world_size: int
    workers: int                    # streams per rank: max(1, num_workers)
    shuffle_buffer: int
    cache_dir: str | None
    cache_size: int
    keys: tuple[str, ...] = ()      # tar members the task uses (local shards skip the others unread)
    verify: bool = True             # check each member's checksum against the sample's json
    skip: Skip | None = None        # after a resume on another stream count: samples already consumed

    @property
    def num_streams(self) -> int:
        return self.world_size * self.workers

    def stream_index(self, worker: int) -> int:
        return self.rank * self.workers + worker


@dataclass
class StreamCursor:
    epoch: int = 0
    consumed: int = 0   # raw samples of this epoch's stream already turned into delivered batches
    batches: int = 0    # batches delivered in this epoch (evaluation) / in total (training)


# ---------------------------------------------------------------------------
# one stream
# ---------------------------------------------------------------------------

def unit_samples(plan: Plan, unit, epoch: int, events: list, counter: ReadCounter) -> Iterator[dict]:
    shard = plan.shards[unit.shard]
    for index, raw in enumerate(shard_samples(shard.url, plan, events, shard.num_samples, counter)):
        if unit.owns(index) and (plan.skip is None or plan.skip.owns(epoch, unit.shard, index)):
            yield raw


def training_epoch_samples(plan: Plan, stream: int, epoch: int, events: list,
                           counter: ReadCounter | None = None) -> Iterator[dict]:
    """The raw samples a training stream reads in ``epoch``, shuffled: a pure function of the arguments.

    ``OPEN_SHARDS`` of the stream's shards are read in turns, and a shuffle buffer mixes the result,
    so neighbouring samples of one shard rarely end up in the same batch.
    """
    units = training_units([s.num_samples for s in plan.shards], plan.num_streams, plan.seed, epoch)[stream]
    counter = counter or ReadCounter()
    mixed = interleave((unit_samples(plan, unit, epoch, events, counter) for unit in units), OPEN_SHARDS)
    return buffered_shuffle(mixed, plan.shuffle_buffer, seeded_rng(plan.seed, epoch, stream, TAG_SHUFFLE))


def eval_samples(plan: Plan, stream: int, events: list, counter: ReadCounter | None = None) -> Iterator[dict]:
    """The raw samples an evaluation stream owns, in shard order."""
    counts = [s.num_samples for s in plan.shards]
    for seg in eval_segments(counts, plan.num_streams)[stream]:
        url = plan.shards[seg.shard].url
        for index, raw in enumerate(shard_samples(url, plan, events, plan.shards[seg.shard].num_samples, counter)):
            if index >= seg.stop and is_local(url):
                break  # (a pipe is drained instead, so its command does not die of SIGPIPE)
            if seg.start <= index < seg.stop:
                yield raw


class StreamState:
    """Decodes and batches one stream's raw samples; knows its position for the cursor."""

    def __init__(self, plan: Plan, worker: int, cursor: StreamCursor):
        self.plan, self.worker = plan, worker
        self.stream = plan.stream_index(worker)
        self.cursor = StreamCursor(**vars(cursor))
        self.events: list = []
        self.read = ReadCounter()   # bytes read since the last emitted batch
        self.pending: list[dict] = []
        self.last_item: dict | None = None

    def decode(self, raw: dict, epoch: int) -> dict | None:
        key_hash = zlib.crc32(str(raw.get("__key__")).encode())
        rng = seeded_rng(self.plan.seed, epoch, TAG_SAMPLE, key_hash)
        try:
            item = sample_arrays(raw, self.plan.task, self.plan.options, rng)
        except BadSample as err:
            self.events.append(("bad_sample", raw.get("__url__", "?"), str(err)))
            return None
        self.last_item = item
        return item

    def no_data_reason(self, epoch: int, empty_epochs: int) -> str:
        units = training_units([s.num_samples for s in self.plan.shards], self.plan.num_streams, self.plan.seed,
                               epoch)[self.stream]
        names = sorted({os.path.basename(self.plan.shards[u.shard].url) for u in units})
        problems = sorted({f"{os.path.basename(where)}: {detail}" for kind, where, detail in self.events
                           if kind != "no_checksums"})
        return (f"no readable samples in {empty_epochs} epochs (rank {self.plan.rank}, worker {self.worker}) from "
                f"shard(s) {', '.join(names)}: {'; '.join(problems[:5]) or 'they hold no samples'}")

    def emit(self, items: list[dict], valid: list[bool], epoch: int, position: int) -> dict:
        batch = collate(items, valid)
        tokens = draw_token_count(self.plan.options,
                                  seeded_rng(self.plan.seed, epoch, self.stream, TAG_BATCH, position))
        if tokens is not None:
            batch["num_tokens"] = tokens
        self.cursor.batches += 1
        batch["_cursor"] = {"worker": self.worker, "epoch": epoch, "consumed": position,
                            "batches": self.cursor.batches}
        batch["_events"] = list(self.events)   # the readers hold this list: empty it, do not rebind
        self.events.clear()
        batch["_bytes_read"] = self.read.take()
        return batch

    # -- training -----------------------------------------------------------
    def training_batches(self) -> Iterator[dict]:
        epoch, skip = self.cursor.epoch, self.cursor.consumed
        empty_epochs = 0
        while True:
            position = 0
            for raw in training_epoch_samples(self.plan, self.stream, epoch, self.events, self.read):
                position += 1
                if position <= skip:
                    continue  # resume: consumed before the checkpoint
                item = self.decode(raw, epoch)
                if item is not None:
                    self.pending.append(item)
                if len(self.pending) == self.plan.batch_size:
                    items, self.pending = self.pending, []
                    yield self.emit(items, [True] * len(items), epoch, position)
            if position < skip:
                self.events.append(("short_epoch", f"stream {self.stream}",
                                    f"epoch {epoch} has {position} samples, cursor had consumed {skip}"))
            empty_epochs = empty_epochs + 1 if position == 0 or self.last_item is None else 0
            if empty_epochs >= MAX_EMPTY_EPOCHS:
                raise NoReadableData(self.no_data_reason(epoch, empty_epochs))
            epoch, skip = epoch + 1, 0

    # -- evaluation ---------------------------------------------------------
    def eval_batches(self) -> Iterator[dict]:
        plan = self.plan
        total = sum(s.num_samples for s in plan.shards)
        target = eval_batches_per_stream(total, plan.num_streams, plan.batch_size)
        skip, position = self.cursor.consumed, 0
        for raw in eval_samples(plan, self.stream, self.events, self.read):
            position += 1
            if position <= skip:
                continue
            item = self.decode(raw, 0)
            if item is not None:
                self.pending.append(item)
            if len(self.pending) == plan.batch_size:
                items, self.pending = self.pending, []
                yield self.emit(items, [True] * len(items), 0, position)
        while self.cursor.batches < target:  # pad: every stream yields `target` batches
            items, self.pending = self.pending, []
            filler = self.last_item or self.padding_template()
            fill = plan.batch_size - len(items)
            yield self.emit(items + [filler] * fill, [True] * len(items) + [False] * fill, 0, position)

    def padding_template(self) -> dict:
        """Any decodable sample of the data set (for a stream that has none of its own)."""
        for shard in self.plan.shards:
            for raw in shard_samples(shard.url, self.plan, [], counter=self.read):
                item = self.decode(raw, 0)
                if item is not None:
                    return item
        raise RuntimeError("evaluation loader: no readable sample in any shard, cannot even pad")

    def batches(self) -> Iterator[dict]:
        return self.training_batches() if self.plan.mode == "train" else self.eval_batches()


# ---------------------------------------------------------------------------
# dataloader workers
# ---------------------------------------------------------------------------

class _StreamsDataset(IterableDataset):
    """torch Dataset view: dataloader worker ``w`` runs logical stream ``(w + offset) % workers``.

    The offset makes a restored loader continue the round-robin at the worker
    whose batch would have come next, so the resumed batch order is identical.
    """

    def __init__(self, plan: Plan, cursors: list[StreamCursor], offset: int):
        self.plan, self.cursors, self.offset = plan, cursors, offset

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.offset) % self.plan.workers
        return StreamState(self.plan, worker, self.cursors[worker]).batches()


def _seed_worker(seed: int, rank: int, worker_id: int) -> None:
    """Global RNGs in workers get deterministic seeds (the loader itself only uses explicit RNGs)."""
    value = int(seeded_rng(seed, rank, worker_id).integers(2 ** 31))
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


# ---------------------------------------------------------------------------
# the public loader
# ---------------------------------------------------------------------------

def _new_stats() -> dict[str, Any]:
    return {"batches": 0, "samples": 0, "bytes_read": 0, "padding": 0, "corrupt_shards": 0, "bad_samples": 0,
            "short_epochs": 0, "corrupt_samples": 0, "short_shards": 0, "missing_samples": 0,
            "unverified_shards": 0, "failed_shards": [], "failures": []}


# event kind -> (stats counter, what the warning says)
EVENTS = {"corrupt_shard": ("corrupt_shards", "skipped the rest of unreadable shard"),
          "bad_sample": ("bad_samples", "skipped a bad sample in"),
          "short_epoch": ("short_epochs", "fewer samples than the cursor expected in"),
          "corrupt_sample": ("corrupt_samples", "skipped a corrupt sample in"),
          "short_shard": ("short_shards", "shard shorter than its manifest:"),
          "no_checksums": ("unverified_shards", "no checksums in")}


class ShardLoader:
    """Iterable of batches with a resumable cursor; build it with :func:`make_loader`."""

    def __init__(self, plan: Plan, num_workers: int, prefetch_factor: int):
        self.plan, self.num_workers, self.prefetch_factor = plan, num_workers, prefetch_factor
        self.stats = _new_stats()
        self.history: dict | None = None   # the run(s) before a resize (while their epoch is not over)
        self._open: weakref.WeakSet = weakref.WeakSet()   # iterations not finished yet (their workers run)
        self._unverified: set[str] = set()
        self.reset()

    # -- iteration ----------------------------------------------------------
    def reset(self) -> None:
        """Back to the start (epoch 0 / the beginning of the evaluation pass)."""
        self.cursors = [StreamCursor() for _ in range(self.plan.workers)]
        self.next_worker = 0

    def __iter__(self) -> Iterator[dict]:
        iteration = self._iterate()
        self._open.add(iteration)
        return iteration

    def close(self) -> None:
        """End every unfinished iteration now: its dataloader worker processes are shut down and joined
        (otherwise that happens when the iterator is garbage collected, possibly only at exit)."""
        for iteration in list(self._open):
            iteration.close()
        self._open.clear()

    def __enter__(self) -> "ShardLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _iterate(self) -> Iterator[dict]:
        for batch in self._batches():
            self._record(batch.pop("_cursor"), batch.pop("_events"))
            self.stats["bytes_read"] += int(batch.pop("_bytes_read"))
            valid = int(batch["valid"].sum())
            self.stats["samples"] += valid
            self.stats["padding"] += len(batch["id"]) - valid
            self.stats["batches"] += 1
            yield batch
        if self.plan.mode == "eval":
            self.reset()  # the pass is complete: the next iteration is a new pass

    def __len__(self) -> int:
        """Batches per rank in one evaluation pass (training loaders are endless)."""
        if self.plan.mode != "eval":
            raise TypeError("a training loader is endless and has no len()")
        total = sum(s.num_samples for s in self.plan.shards)
        return self.plan.workers * eval_batches_per_stream(total, self.plan.num_streams, self.plan.batch_size)

    def _batches(self) -> Iterator[dict]:
        if self.num_workers == 0:
            return StreamState(self.plan, 0, self.cursors[0]).batches()
        dataset = _StreamsDataset(self.plan, [StreamCursor(**vars(c)) for c in self.cursors], self.next_worker)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                               prefetch_factor=self.prefetch_factor,
                               worker_init_fn=partial(_seed_worker, self.plan.seed, self.plan.rank)))

    def _record(self, cursor: dict, events: list) -> None:
        worker = int(cursor["worker"])
        self.cursors[worker] = StreamCursor(int(cursor["epoch"]), int(cursor["consumed"]), int(cursor["batches"]))
        self.next_worker = (worker + 1) % self.plan.workers
        if self.history is not None and self.epoch > self.history["epoch"]:
            self.history = None   # this rank is past the resized epoch (ranks still in it keep their copy)
        for kind, where, detail in events:
            self._count_event(kind, where, detail)

    def _count_event(self, kind: str, where: str, detail: str) -> None:
        counter, what = EVENTS[kind]
        if kind == "no_checksums":
            if where in self._unverified:
                return   # counted once per shard, however often it is read
            self._unverified.add(where)
        self.stats[counter] += 1
        if kind == "short_shard":   # detail: "read R of the E samples its manifest lists (M missing)"
            self.stats["missing_samples"] += int(re.search(r"\((\d+) missing\)", detail).group(1))
        if len(self.stats["failures"]) < MAX_LOGGED_FAILURES:
            self.stats["failures"].append({"kind": kind, "where": where, "detail": detail})
        if kind in ("corrupt_shard", "short_shard", "corrupt_sample") and where not in self.stats["failed_shards"]:
            self.stats["failed_shards"].append(where)
        if kind != "no_checksums" or self.stats[counter] == 1:   # "no checksums": one warning per loader
            warnings.warn(f"loader: {what} {where}: {detail}", LoaderWarning, stacklevel=3)

    def counts(self) -> dict[str, int]:
        """The data-integrity counters (for metrics and the end-of-run summary)."""
        return {k: int(self.stats[k]) for k in ("corrupt_samples", "corrupt_shards", "short_shards",
                                                "missing_samples", "bad_samples", "unverified_shards")}

    # -- cursor -------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        p = self.plan
        return {"mode": p.mode, "seed": p.seed, "world_size": p.world_size, "num_workers": self.num_workers,
                "batch_size": p.batch_size, "shards": fingerprint(p.shards)}

    def state_dict(self) -> dict[str, Any]:
        """This rank's cursor (small, JSON-serialisable). Save one per rank, or use gathered_state_dict()."""
        state = {"format": CURSOR_FORMAT, "rank": self.plan.rank, **self._identity(),
                 "shuffle_buffer": self.plan.shuffle_buffer,
                 "next_worker": self.next_worker, "streams": [vars(c).copy() for c in self.cursors]}
        if self.history is not None:
            state["resized_from"] = self.history
        return state

    def gathered_state_dict(self) -> dict[str, Any]:
        """Every rank's cursor in one dict (a collective when torch.distributed is initialised).
        The only form that can resume on a different number of ranks or workers."""
        mine = self.state_dict()
        history = mine.pop("resized_from", None)   # the same on every rank: stored once
        states = [mine]
        if self.plan.world_size > 1 and _dist_ready():
            states = [None] * self.plan.world_size
            torch.distributed.all_gather_object(states, mine)
        return {"ranks": states, "resized_from": history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a cursor made by state_dict() or gathered_state_dict(). A training cursor
        gathered from a run with another world size, worker count or batch size continues that
        run's data stream (docs/loader.md, "Resume cursor")."""
        if "ranks" in state and self._resized(state):
            self._load_resized(state)
            return
        history = state.get("resized_from")
        if "ranks" in state:
            matches = [s for s in state["ranks"] if s.get("rank") == self.plan.rank]
            if not matches:
                raise ValueError(f"loader cursor has no entry for rank {self.plan.rank}")
            state = matches[0]
        if state.get("format") != CURSOR_FORMAT:
            raise ValueError(f"loader cursor format {state.get('format')!r}, expected {CURSOR_FORMAT}")
        for key, value in {"rank": self.plan.rank, **self._identity()}.items():
            if state.get(key) != value:
                raise ValueError(f"loader cursor was saved with {key}={state.get(key)!r} but this loader has "
                                 f"{key}={value!r}; an exact resume needs the same setup (a training cursor "
                                 f"from gathered_state_dict() may change world size, workers and batch size)")
        self.cursors = [StreamCursor(**s) for s in state["streams"]]
        self.next_worker = int(state["next_worker"])
        self._set_history(history or state.get("resized_from"))

    def _resized(self, state: dict[str, Any]) -> bool:
        first = state["ranks"][0] if state["ranks"] else {}
        changed = any(first.get(k) != v for k, v in self._identity().items()
                      if k in ("world_size", "num_workers", "batch_size"))
        same = all(first.get(k) == v for k, v in self._identity().items() if k in ("mode", "seed", "shards"))
        return changed and same and self.plan.mode == "train" and first.get("format") == CURSOR_FORMAT

    def _counts(self) -> list[int]:
        counts = [s.num_samples for s in self.plan.shards]
        if any(c is None for c in counts):
            raise ValueError("loader cursor: resuming on a different number of ranks or workers needs the "
                             "shards' sample counts (load them through their manifest)")
        return counts

    def _load_resized(self, state: dict[str, Any]) -> None:
        history = history_from_gathered(state, self.plan.shuffle_buffer)
        buffer = history["shuffle_buffer"]
        self._set_history(history)
        self.cursors = [StreamCursor(epoch=history["epoch"]) for _ in range(self.plan.workers)]
        self.next_worker = 0
        self.stats["resize_replayed"] = replayed(history, self._counts(), self.plan.seed, buffer)

    def _set_history(self, history: dict | None) -> None:
        """Skip what the run(s) before a resize consumed of their earliest epoch."""
        self.history = history
        self.plan.skip = None if history is None else done_set(
            history, self._counts(), self.plan.seed, history.get("shuffle_buffer", self.plan.shuffle_buffer))

    @property
    def epoch(self) -> int:
        """The lowest epoch any of this rank's streams is in."""
        return min(c.epoch for c in self.cursors)


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if world_size is None:
        world_size = torch.distributed.get_world_size() if _dist_ready() else 1
    if rank is None:
        rank = torch.distributed.get_rank() if _dist_ready() else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"make_loader: rank {rank} is outside world_size {world_size}")
    return rank, world_size


def _with_counts(shards: list[Shard], plan: Plan) -> list[Shard]:
    missing = [s for s in shards if s.num_samples is None]
    if missing:
        warnings.warn(f"loader: no manifest counts for {len(missing)} shards: counting their samples by reading "
                      f"them (evaluation mode needs counts to balance ranks)", LoaderWarning, stacklevel=3)
    return [s if s.num_samples is not None else Shard(s.url, count_samples(s.url, plan)) for s in shards]


def make_loader(source: str | os.PathLike | Sequence[str | os.PathLike], *, task: str, batch_size: int,
                mode: str, seed: int, rank: int | None = None, world_size: int | None = None,
                num_workers: int = 0, shuffle_buffer: int = 64, cache_dir: str | None = None,
                cache_size: int = -1, prefetch_factor: int = 2, verify: bool = True,
                **task_options) -> ShardLoader:
    """Batches of ``task`` ("vae" or "dit") from shards; see docs/loader.md for options and batch keys.

    ``mode="train"``: endless, shuffled, every rank x worker reads different shards.
    ``mode="eval"``: one pass, every sample exactly once across ranks, equal batch counts per rank
    (padding marked by ``batch["valid"]``). ``rank``/``world_size`` default to the initialised
    process group (else 0 / 1). ``cache_dir`` keeps downloaded remote shards on local disk
    (``cache_size`` bytes, LRU; -1: unbounded). ``verify`` checks every member's checksum (skipping and
    counting corrupt samples, see :mod:`data_pipeline.loading.shard_reader`).
    """
    if mode not in MODES:
        raise ValueError(f"make_loader: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"make_loader: batch_size must be a positive int, got {batch_size!r}")
    if num_workers < 0 or shuffle_buffer < 0:
        raise ValueError("make_loader: num_workers and shuffle_buffer must be >= 0")
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    options = parse_task_options(task, task_options)
    if options.resample is None:  # fresh point subsets are a VAE training augmentation; eval stays fixed
        options.resample = mode == "train" and task == "vae"
    rank, world_size = _rank_and_world(rank, world_size)
    keys = required_keys(task, options) + optional_keys(task, options)
    plan = Plan(resolve_source(source), task, options, batch_size, mode, int(seed), rank, world_size,
                max(1, num_workers), shuffle_buffer, cache_dir, cache_size, keys, bool(verify))
    if mode == "eval":
        plan.shards = _with_counts(plan.shards, plan)
    else:
        parts_per_shard([s.num_samples for s in plan.shards], plan.num_streams)  # fewer samples than streams raises
    return ShardLoader(plan, num_workers, prefetch_factor)
