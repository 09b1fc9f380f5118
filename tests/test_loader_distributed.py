"""Two real processes over gloo: evaluation covers every sample once and both ranks finish together.

Each step does an all_reduce, as DDP does; if one rank had more batches than the
other it would wait forever in that collective, so the gloo timeout (and the
join timeout below) turns a deadlock into a failure.
"""
from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import socket

import pytest
import torch
import torch.distributed as dist
from loader_fixtures import stored_samples
from multiproc import spawn_ranks

WORLD = 2
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, port: int, shard_dir: str, out: str, num_workers: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # A spawned child inherits "spawn" as its start method, so its DataLoader workers would re-import
    # everything; ranks started by torchrun/srun fork their workers: do the same here.
    multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    from data_pipeline import make_loader
    from trainer.engines import shutdown_process_group
    small = dict(task="vae", num_surface=64, num_vol=16, num_near=16, num_workers=num_workers)

    # evaluation: rank and world size come from the process group
    loader = make_loader(shard_dir, batch_size=2, mode="eval", seed=0, **small)
    ids, steps = [], 0
    for batch in loader:
        loss = torch.tensor([float(batch["valid"].sum())])
        dist.all_reduce(loss)  # a DDP step; unequal batch counts would hang here
        ids += [i for i, ok in zip(batch["id"], batch["valid"].tolist()) if ok]
        steps += 1

    # training: the cursor of every rank gathered into one checkpointable dict, and restored
    train = make_loader(shard_dir, batch_size=2, mode="train", seed=0, **small)
    iterator = iter(train)
    [next(iterator) for _ in range(2)]
    state = train.gathered_state_dict()
    expected_next = next(iterator)["id"]
    restored = make_loader(shard_dir, batch_size=2, mode="train", seed=0, **small)
    restored.load_state_dict(json.loads(json.dumps(state)))
    resumed_ok = next(iter(restored))["id"] == expected_next
    train.close()      # join the dataloader workers of the unfinished iterations now
    restored.close()

    results = [None] * WORLD
    dist.all_gather_object(results, {"ids": ids, "steps": steps, "len": len(loader),
                                     "ranks_in_state": len(state["ranks"]), "resumed_ok": resumed_ok})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    shutdown_process_group()   # barrier, then destroy (trainer/engines/base.py)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_exactly_once_and_no_deadlock_over_gloo(loader_shards, tmp_path, num_workers):
    out = tmp_path / "results.json"
    # bounded: a deadlocked rank fails the test (with both ranks' output) instead of hanging it
    spawn_ranks(rank_main, (free_port(), str(loader_shards), str(out), num_workers), nprocs=WORLD,
                log_dir=tmp_path / "logs", timeout_s=TIMEOUT_S)   # every rank exits with 0

    results = json.loads(out.read_text())
    assert len({r["steps"] for r in results}) == 1 and results[0]["steps"] == results[0]["len"]
    seen = sorted(i for r in results for i in r["ids"])
    assert seen == sorted(stored_samples(loader_shards))
    assert all(r["ranks_in_state"] == WORLD and r["resumed_ok"] for r in results)
