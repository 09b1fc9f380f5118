"""One process of a strategy test (started by tests/test_strategies.py, alone or under torchrun).

``train``: a few optimiser steps of the VAE and then of the DiT through the loop's own
``Trainer.optimizer_step`` on fixed global batches (this rank takes its rows), with the engine named
by the overrides; writes per-step losses (mean over ranks), per-rank parameter/optimiser bytes, the
gathered weights (model and EMA) and a checkpoint of each task.
``resume``: load such a checkpoint (any world size), write the gathered weights, take one more step.
"""
from __future__ import annotations

import json
import os
import sys
import types
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from trainer import checkpoint as ckpt
from trainer.config import load_train_config
from trainer.engines import create_engine, shutdown_process_group
from trainer.preemption import StopRequest
from trainer.loop import Trainer, build_loader, make_optimizer, make_scheduler
from trainer.tasks import make_task


def rows(batch: dict, lo: int, hi: int) -> dict:
    size = len(batch["id"])
    return {k: (v[lo:hi] if isinstance(v, (list, torch.Tensor)) and len(v) == size and getattr(v, "ndim", 1) > 0
                else v) for k, v in batch.items()}


def setup(overrides: list[str]):
    cfg = load_train_config(None, overrides)
    engine = create_engine(cfg.engine, cfg.precision, cfg.optim)
    # Different initial weights per rank (the loop seeds with seed + rank): every strategy must start
    # from rank 0's weights, which is what the one-process reference has.
    torch.manual_seed(engine.rank)
    task = make_task(cfg, engine.device)
    task.prepare(partial(build_loader, cfg, task, engine), engine)
    model = engine.prepare(task.objective, partial(make_optimizer, cfg=cfg.optim),
                           partial(make_scheduler, cfg=cfg.optim, max_steps=cfg.run.max_steps))
    ema = engine.make_ema(cfg.ema.decay)
    return cfg, engine, task, model, ema


def local_batches(global_batches: list[dict], engine, accum: int) -> list[list[dict]]:
    """Per step, this rank's micro-batches: micro-step m covers global rows [m G/A, (m+1) G/A) and this
    rank takes its slice of them, matching how BatchRandom hands out its per-micro-step draws."""
    out = []
    for b in global_batches:
        micro = len(b["id"]) // accum
        local = micro // engine.world_size
        out.append([rows(b, m * micro + engine.rank * local, m * micro + (engine.rank + 1) * local)
                    for m in range(accum)])
    return out


def run_steps(cfg, engine, task, model, ema, batches: list[list[dict]], first_step: int) -> list[float]:
    """The loop's optimizer_step on each step's micro-batches; returns each step's loss averaged over ranks."""
    state = types.SimpleNamespace(cfg=cfg, engine=engine, task=task, model=model, step=first_step,
                                  stop=StopRequest(), stop_agreed=False)
    losses = []
    for micro_batches in batches:
        metrics, applied = Trainer.optimizer_step(state, iter(micro_batches))
        assert applied, f"step {state.step} was skipped"
        ema.update(state.step + 1)   # as the loop does: the n-th update (EMA warm-up)
        losses.append(engine.all_reduce_mean({"loss": metrics["loss"]})["loss"])
        state.step += 1
    return losses


def train_task(name: str, overrides: list[str], batch_file: Path, out: Path) -> dict:
    cfg, engine, task, model, ema = setup(overrides)
    try:
        batches = local_batches(torch.load(batch_file, weights_only=False), engine, cfg.optim.grad_accum)
        losses = run_steps(cfg, engine, task, model, ema, batches, 0)
        memory = engine.gather_objects(engine.memory_report())
        full, full_ema = engine.full_state_dict(), engine.full_state_dict(ema)
        ckpt.save_checkpoint(engine, out / f"{name}_ckpt", len(batches), ema=ema, loader_state=None, config=cfg,
                             meta_extra={"derived": task.derived()}, metric=None, keep_last=1)
        if engine.is_main:
            torch.save({"model": full, "ema": full_ema}, out / f"{name}_weights.pt")
        return {"losses": losses, "memory": memory}
    finally:
        engine.close()


def resume_task(name: str, overrides: list[str], batch_file: Path, out: Path, checkpoint: Path) -> dict:
    cfg, engine, task, model, ema = setup(overrides)
    try:
        meta, _ = ckpt.load_checkpoint(engine, checkpoint, ema=ema)
        full, full_ema = engine.full_state_dict(), engine.full_state_dict(ema)
        adam = engine.optimizer.optimizer if engine.strategy == "deepspeed" else engine.optimizer
        adam_steps = sorted({float(st["step"]) for st in adam.state.values()})   # restored optimiser state
        batches = local_batches(torch.load(batch_file, weights_only=False), engine, cfg.optim.grad_accum)[:1]
        losses = run_steps(cfg, engine, task, model, ema, batches, meta["step"])
        if engine.is_main:
            torch.save({"model": full, "ema": full_ema}, out / f"{name}_resumed_weights.pt")
        return {"losses": losses, "lr": engine.lr(), "adam_steps": adam_steps}
    finally:
        engine.close()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    # One group for both tasks: re-initialising on torchrun's store hangs, and DeepSpeed caches its
    # groups per process (a real run has one engine per process).
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    out = Path(spec["out"])
    results = {}
    for job in spec["jobs"]:
        if spec["mode"] == "train":
            results[job["name"]] = train_task(job["name"], job["overrides"], Path(job["batches"]), out)
        else:
            results[job["name"]] = resume_task(job["name"], job["overrides"], Path(job["batches"]), out,
                                               Path(job["checkpoint"]))
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "results.json").write_text(json.dumps(results))
    shutdown_process_group()   # barrier, then destroy: no rank leaves while its peer is in a collective


if __name__ == "__main__":
    main()
