"""Continuing a training data stream on a different number of streams (ranks x dataloader workers).

The samples a training stream consumes in an epoch are a pure function of (seed, epoch, stream,
number of streams, shard counts, shuffle buffer): :func:`stream_order` replays that order from the
manifest counts alone, without reading any shard. A gathered cursor of the old run therefore says
exactly which samples of the earliest epoch any old stream was in (``epoch``) were consumed: the
*done* set. The resized run restarts at ``epoch`` with its own streams and plan and skips the done
samples, so within that epoch nothing is replayed and nothing is skipped. What old streams had
already consumed of later epochs (a stream that reached its epoch end first) is read again in those
epochs: that is the replay bound, reported as ``replayed``.

A resized run resized again before it leaves ``epoch`` keeps the chain (``resized_from``): its own
streams' orders are computed with the older done set, as they were read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from data_pipeline.loading.shard_order import (
    TAG_SHUFFLE,
    buffered_shuffle,
    interleave,
    seeded_rng,
    training_units,
)

OPEN_SHARDS = 4   # shards a training stream reads in turns (the loader imports it from here)


@dataclass(frozen=True)
class Skip:
    """Samples to leave out of epoch ``epoch``: ``done[offset[shard] + index]`` is True."""
    epoch: int
    done: np.ndarray     # bool [total samples]
    offsets: np.ndarray  # int [shards]: global index of each shard's first sample

    def owns(self, epoch: int, shard: int, index: int) -> bool:
        return epoch != self.epoch or not self.done[self.offsets[shard] + index]


def offsets_of(counts: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def stream_order(counts: Sequence[int], num_streams: int, seed: int, epoch: int, stream: int,
                 shuffle_buffer: int, skip: Skip | None) -> list[int]:
    """Global sample indices in the order ``stream`` consumes them in ``epoch`` (the loader's order)."""
    offsets = offsets_of(counts)
    units = training_units(counts, num_streams, seed, epoch)[stream]

    def unit_ids(unit):
        for index in range(counts[unit.shard]):
            if unit.owns(index) and (skip is None or skip.owns(epoch, unit.shard, index)):
                yield int(offsets[unit.shard] + index)

    mixed = interleave((unit_ids(u) for u in units), OPEN_SHARDS)
    return list(buffered_shuffle(mixed, shuffle_buffer, seeded_rng(seed, epoch, stream, TAG_SHUFFLE)))


def global_streams(ranks: list[dict]) -> list[dict]:
    """The stream cursors of a gathered cursor, by global stream index (rank * workers + worker)."""
    by_rank = sorted(ranks, key=lambda s: s["rank"])
    return [stream for state in by_rank for stream in state["streams"]]


def done_set(history: dict, counts: Sequence[int], seed: int, shuffle_buffer: int) -> Skip:
    """The samples of ``history["epoch"]`` consumed by the run described in ``history``.

    ``history``: {"epoch", "world_size", "workers", "shuffle_buffer" (optional, default
    ``shuffle_buffer``), "streams": [{"epoch", "consumed"} per global stream], "resized_from": an older
    history or None}."""
    epoch, num_streams = history["epoch"], history["world_size"] * history["workers"]
    shuffle_buffer = history.get("shuffle_buffer", shuffle_buffer)
    older = history.get("resized_from")
    base = done_set(older, counts, seed, shuffle_buffer) if older and older["epoch"] == epoch else None
    done = base.done.copy() if base else np.zeros(int(sum(counts)), dtype=bool)
    for g, cursor in enumerate(history["streams"]):
        if cursor["epoch"] < epoch:
            continue
        order = stream_order(counts, num_streams, seed, epoch, g, shuffle_buffer, base)
        done[order if cursor["epoch"] > epoch else order[:cursor["consumed"]]] = True
    return Skip(epoch, done, offsets_of(counts))


def history_from_gathered(state: dict[str, Any], shuffle_buffer: int) -> dict:
    """A resize history from a gathered cursor (``{"ranks": [...]}`` with every old rank);
    ``shuffle_buffer`` stands in for cursors saved before they recorded theirs."""
    ranks = state["ranks"]
    first = ranks[0]
    if sorted(s.get("rank") for s in ranks) != list(range(first["world_size"])):
        raise ValueError(f"loader cursor: resuming on a different number of ranks needs every old rank's "
                         f"cursor (gathered_state_dict()), got ranks {[s.get('rank') for s in ranks]} of "
                         f"world_size {first['world_size']}")
    streams = global_streams(ranks)
    epoch = min(c["epoch"] for c in streams)
    chain = state.get("resized_from") or next((s["resized_from"] for s in ranks if s.get("resized_from")), None)
    if chain is not None and chain["epoch"] != epoch:
        chain = None  # an older resize in an epoch that is over: no longer needed
    return {"epoch": epoch, "shuffle_buffer": first.get("shuffle_buffer", shuffle_buffer), "world_size": first["world_size"],
            "workers": max(1, first["num_workers"]), "streams": [{"epoch": c["epoch"], "consumed": c["consumed"]}
                                                                  for c in streams],
            "resized_from": chain}


def replayed(history: dict, counts: Sequence[int], seed: int, shuffle_buffer: int) -> int:
    """Samples the old run consumed in epochs after ``history["epoch"]`` (read again after the resize)."""
    epoch, num_streams = history["epoch"], history["world_size"] * history["workers"]
    total = 0
    for g, cursor in enumerate(history["streams"]):
        if cursor["epoch"] > epoch:
            total += cursor["consumed"] + sum(len(stream_order(counts, num_streams, seed, e, g, shuffle_buffer, None))
                                              for e in range(epoch + 1, cursor["epoch"]))
    return total
