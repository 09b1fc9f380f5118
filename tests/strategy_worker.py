"""One process of a strategy test (started by tests/test_strategies.py, alone or under torchrun).

``train``: a few optimiser steps of the VAE and then of the DiT through the loop's own
``Trainer.optimizer_step`` on fixed global batches (this rank takes its rows), with the engine named
by the overrides; writes per-step losses (mean over ranks), per-rank parameter/optimiser bytes, the
gathered weights (model and EMA) and a checkpoint of each task.
``resume``: load such a checkpoint (any world size), write the gathered weights, take one more step.
``gradient``: one optimiser step on the batches this rank's own loader (``make_loader`` on the shards)
hands out, with plain SGD at a large learning rate and no clipping, so the update the strategy
applies is ``-lr x`` the reduced, accumulated gradient; rank 0 gathers every rank's micro-batches and
computes the same step's gradient with plain autograd on one copy of the initial network (no engine,
no process group). Writes both, the EMA after the step and both EMA inputs.
"""
from __future__ import annotations

import copy
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
from trainer.loop import Trainer, build_loader, make_optimizer, make_scheduler
from trainer.preemption import StopRequest
from trainer.tasks import BatchRandom, make_task, to_device


def rows(batch: dict, lo: int, hi: int) -> dict:
    size = len(batch["id"])
    return {k: (v[lo:hi] if isinstance(v, (list, torch.Tensor)) and len(v) == size and getattr(v, "ndim", 1) > 0
                else v) for k, v in batch.items()}


def setup(overrides: list[str], sgd_lr: float | None = None):
    """Engine, task, prepared model and EMA; with ``sgd_lr`` also a copy of the initial objective (rank 0's
    weights) and plain SGD at a constant ``sgd_lr`` instead of AdamW with its schedule."""
    cfg = load_train_config(None, overrides)
    engine = create_engine(cfg.engine, cfg.precision, cfg.optim)
    # Different initial weights per rank (the loop seeds with seed + rank): every strategy must start
    # from rank 0's weights, which is what the one-process reference has.
    torch.manual_seed(engine.rank)
    task = make_task(cfg, engine.device)
    task.prepare(partial(build_loader, cfg, task, engine), engine)
    if sgd_lr is None:
        make_opt = partial(make_optimizer, cfg=cfg.optim)
        make_sched = partial(make_scheduler, cfg=cfg.optim, max_steps=cfg.run.max_steps)
        initial = None
    else:
        def make_opt(params):
            return torch.optim.SGD(params, lr=sgd_lr)
        def make_sched(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        initial = copy.deepcopy(task.objective)   # before the engine partitions or wraps it
    model = engine.prepare(task.objective, make_opt, make_sched)
    ema = engine.make_ema(cfg.ema.decay)
    if sgd_lr is not None:
        return cfg, engine, task, model, ema, initial
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


def loop_state(cfg, engine, task, model, step: int) -> types.SimpleNamespace:
    """What Trainer.optimizer_step reads from the trainer (no stop signal arrives here)."""
    return types.SimpleNamespace(cfg=cfg, engine=engine, task=task, model=model, step=step,
                                 stop=StopRequest(), stop_agreed=False)


def run_steps(cfg, engine, task, model, ema, batches: list[list[dict]], first_step: int) -> list[float]:
    """The loop's optimizer_step on each step's micro-batches; returns each step's loss averaged over ranks."""
    state = loop_state(cfg, engine, task, model, first_step)
    losses = []
    for micro_batches in batches:
        metrics, applied = Trainer.optimizer_step(state, iter(micro_batches))
        assert applied, f"step {state.step} was skipped"
        ema.update(state.step + 1)   # as the loop does: the n-th update (EMA warm-up)
        losses.append(engine.all_reduce_mean({"loss": metrics["loss"]})["loss"])
        state.step += 1
    return losses


def concat_rows(parts: list[dict]) -> dict:
    """The inverse of :func:`rows`: per-rank batches stacked in rank order (one global micro-batch)."""
    size = len(parts[0]["id"])
    out = {}
    for k, v in parts[0].items():
        if isinstance(v, torch.Tensor) and v.ndim > 0 and len(v) == size:
            out[k] = torch.cat([p[k] for p in parts])
        elif isinstance(v, list) and len(v) == size:
            out[k] = [x for p in parts for x in p[k]]
        else:
            out[k] = v
    return out


def reference_gradients(cfg, task, objective, global_micro: list[dict]) -> dict[str, torch.Tensor]:
    """Step 0's gradient on one process, by plain autograd: mean loss over the global batch, each of
    the ``A`` micro-batches weighted 1/A, with the draws a one-process run takes for it."""
    for m, batch in enumerate(global_micro):
        rand = BatchRandom(cfg.run.seed, 0, m, 0, 1, len(batch["id"]), torch.device("cpu"))
        loss, _ = task.compute(objective, to_device(batch, torch.device("cpu")), rand, 0)
        (loss / len(global_micro)).backward()
    return {n: p.grad.detach().clone() for n, p in objective.named_parameters() if p.grad is not None}


def gradient_task(name: str, overrides: list[str], out: Path, lr: float) -> dict:
    cfg, engine, task, model, ema, initial = setup(overrides, sgd_lr=lr)
    try:
        loader = iter(build_loader(cfg, task, engine))
        micro = [next(loader) for _ in range(cfg.optim.grad_accum)]
        before = engine.full_state_dict()
        _, applied = Trainer.optimizer_step(loop_state(cfg, engine, task, model, 0), iter(micro))
        assert applied, "the SGD step was skipped"
        ema.update(1)   # as the loop does after its first step
        after, after_ema = engine.full_state_dict(), engine.full_state_dict(ema)
        per_rank = engine.gather_objects(micro)   # [rank][micro-step] -> batch
        ids = [[list(b["id"]) for b in rank_batches] for rank_batches in per_rank]
        if engine.is_main:
            global_micro = [concat_rows([per_rank[r][m] for r in range(engine.world_size)])
                            for m in range(len(micro))]
            want = reference_gradients(cfg, task, initial, global_micro)
            got = {k: (before[k] - after[k]) / lr for k in want}
            torch.save({"got": got, "want": want, "before": before, "after": after, "ema": after_ema,
                        "decay": ema.decay_at(1)}, out / f"{name}_gradients.pt")
        return {"ids": ids}
    finally:
        engine.close()


def rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_task(name: str, overrides: list[str], batch_file: Path, out: Path) -> dict:
    """Peak resident memory of this process during two AdamW steps, measured by the kernel (not by the
    engine): VmHWM after resetting it once the model is prepared, minus VmRSS before the model existed.
    It covers parameters, gradients, optimiser state, EMA, communication buffers and activations."""
    import deepspeed  # noqa: F401  (every strategy's libraries loaded before the baseline: same modules
    import torch.distributed.fsdp  # noqa: F401  in every process, only the training state differs)

    before = rss_kib("VmRSS")
    cfg, engine, task, model, ema = setup(overrides)
    try:
        batches = local_batches(torch.load(batch_file, weights_only=False), engine, cfg.optim.grad_accum)[:2]
        run_steps(cfg, engine, task, model, ema, batches[:1], 0)   # first step: optimiser state exists
        Path("/proc/self/clear_refs").write_text("5")   # reset VmHWM to the current RSS
        run_steps(cfg, engine, task, model, ema, batches[1:], 1)
        peak = rss_kib("VmHWM")
        params = sum(getattr(p, "ds_numel", p.numel()) for p in task.net.parameters())   # ZeRO-3: p.numel() is 0
        return {"peak_mib": engine.gather_objects((peak - before) / 1024), "params": params,
                "engine_report": engine.gather_objects(engine.memory_report())}
    finally:
        engine.close()


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
        mode = job.get("mode", spec["mode"])
        if mode == "memory":
            results[job["name"]] = memory_task(job["name"], job["overrides"], Path(job["batches"]), out)
        elif mode == "gradient":
            results[job["name"]] = gradient_task(job["name"], job["overrides"], out, job["lr"])
        elif mode == "train":
            results[job["name"]] = train_task(job["name"], job["overrides"], Path(job["batches"]), out)
        else:
            results[job["name"]] = resume_task(job["name"], job["overrides"], Path(job["batches"]), out,
                                               Path(job["checkpoint"]))
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "results.json").write_text(json.dumps(results))
    shutdown_process_group()   # barrier, then destroy: no rank leaves while its peer is in a collective


if __name__ == "__main__":
    main()
