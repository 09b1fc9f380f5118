"""The generic training loop: the same for the VAE and the DiT, and for every engine strategy.

    setup: engine -> task (network + objective) -> resume? -> engine.prepare -> EMA -> loader -> MLflow
    per step: grad_accum micro-batches (forward under autocast, backward) -> engine.step (clip, guard)
              -> EMA -> metrics (all-reduced every log_every) -> checkpoint / evaluation at intervals

Task-specific work (what a batch means, the loss) lives in trainer/tasks.py; distributed work in
trainer/engines/; saving in trainer/checkpoint.py; MLflow in trainer/tracking.py.
"""
from __future__ import annotations

import datetime
import math
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.loading import loader as data_loader
from data_pipeline.typed_config import save_config
from trainer import checkpoint as ckpt
from trainer.config import OptimConfig, TrainConfig
from trainer.engines import Engine, create_engine, resolve_run_config
from trainer.engines.resolve import resolved_header
from trainer.evaluation import Evaluator
from trainer.preemption import StopRequest
from trainer.tasks import BatchRandom, Task, make_task, to_device
from trainer.tracking import Tracker


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row."""


# ---------------------------------------------------------------------------
# optimiser, schedule, guard
# ---------------------------------------------------------------------------

def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warm-up from 0, then cosine decay to min_lr_ratio (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if not cfg.cosine:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    decay = [p for p in params if p.ndim >= 2]      # no weight decay on biases, norms, embeddings' 1-D params
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **adamw_kernel(params))


def adamw_kernel(params: list[torch.nn.Parameter]) -> dict[str, bool]:
    """The fused AdamW kernel (one kernel for all parameters) for plain CPU/CUDA tensors; the
    multi-tensor (foreach) one for sharded DTensor parameters (FSDP2)."""
    plain = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if plain else {"foreach": True}


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg, max_steps=max_steps))


@dataclass
class NonFiniteGuard:
    limit: int
    in_a_row: int = 0
    skipped: int = 0

    def update(self, ok: bool, step: int) -> None:
        if ok:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(
                f"{self.in_a_row} non-finite losses/gradients in a row (last at step {step}): training diverged; "
                f"lower optim.lr, raise optim.warmup_steps or use precision=fp32 (limit: run.nan_guard)")


# ---------------------------------------------------------------------------
# metrics over a logging window
# ---------------------------------------------------------------------------

@dataclass
class MetricWindow:
    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    steps: int = 0

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] += v
        self.steps += 1

    def reduce(self, engine: Engine) -> dict[str, float]:
        """Means over the window and over ranks; per-t-bin sums become mean losses per bin."""
        means = engine.all_reduce_mean({k: v / max(1, self.steps) for k, v in self.sums.items()})
        out = {k: v for k, v in means.items() if not k.endswith(("_sum", "_n"))}
        for key in [k for k in means if k.endswith("_sum")]:
            count = means[key[:-4] + "_n"]
            if count > 0:
                out[key[:-4]] = means[key] / count
        self.sums, self.steps = defaultdict(float), 0
        return out


# ---------------------------------------------------------------------------
# progress: a tqdm bar on a terminal, plain lines in a log file
# ---------------------------------------------------------------------------

class Progress:
    """Rank 0's progress. On a terminal a tqdm bar; otherwise (SLURM job logs, redirected stderr)
    one plain line per logging step, since a bar's carriage-return updates fill a log with fragments."""

    def __init__(self, cfg: TrainConfig, start_step: int, enabled: bool, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.max_steps, self.start_step = cfg.run.max_steps, start_step
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.bar = tqdm(total=cfg.run.max_steps, initial=start_step, disable=not self.tty, file=self.stream,
                        desc=f"train {cfg.task}", unit="step", dynamic_ncols=True)
        self.started = time.perf_counter()

    def update(self) -> None:
        self.bar.update(1)

    def log(self, step: int, logged: dict[str, float]) -> None:
        if self.tty:
            self.bar.set_postfix(loss=f"{logged['loss']:.4g}", lr=f"{logged['lr']:.2e}",
                                 samples_s=f"{logged['samples_per_s']:.1f}", data_wait=f"{logged['data_wait']:.0%}")
        elif self.enabled:
            print(self.line(step, logged), file=self.stream, flush=True)

    def line(self, step: int, logged: dict[str, float]) -> str:
        """``step 100/300 loss 0.1234 lr 1.00e-03 samples/s 12.3 data wait 4% ETA 0:01:40`` (ETA from this
        run's pace; data wait: the share of step time spent waiting for the loader)."""
        per_step = (time.perf_counter() - self.started) / max(1, step - self.start_step)
        eta = datetime.timedelta(seconds=round(per_step * (self.max_steps - step)))
        return (f"step {step}/{self.max_steps} loss {logged['loss']:.4g} lr {logged['lr']:.2e} "
                f"samples/s {logged['samples_per_s']:.1f} data wait {logged['data_wait']:.0%} ETA {eta}")

    def note(self, text: str) -> None:
        """One line of its own (above the bar on a terminal)."""
        if self.tty:
            self.bar.write(text, file=self.stream)
        elif self.enabled:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------

def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def build_loader(cfg: TrainConfig, task: Task, engine: Engine, seed_offset: int = 0, evaluation: bool = False):
    """The training loader (``evaluation``: the same stream with the task's evaluation options, e.g. a
    fixed condition view)."""
    return data_loader.make_loader(
        cfg.data.path, task=task.loader_task(), batch_size=cfg.data.batch_size, mode="train",
        seed=cfg.run.seed + seed_offset, rank=engine.rank, world_size=engine.world_size,
        num_workers=cfg.data.num_workers, **task.loader_options(evaluation))


@dataclass
class Trainer:
    cfg: TrainConfig
    engine: Engine
    task: Task
    model: torch.nn.Module
    ema: Any
    loader: Any
    tracker: Tracker
    evaluator: Evaluator
    step: int = 0
    tracker_run_id: str | None = None
    resolved_from: dict[str, str] = field(default_factory=dict)   # engine setting -> its source
    best_metric_candidate: float | None = None   # last logged loss: the checkpoint's "best" score
    losses: dict[int, float] = field(default_factory=dict)   # step -> this rank's loss (for tests)
    stop: StopRequest = field(default_factory=StopRequest)
    stop_agreed: bool = False          # some rank got a stop signal: every rank stops after this step

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.dir)

    def optimizer_step(self, batches: Iterator[dict]) -> tuple[dict[str, float], bool]:
        """grad_accum micro-steps then one engine step; returns (metrics, whether it was applied)."""
        cfg, engine = self.cfg, self.engine
        accum = cfg.optim.grad_accum
        totals: dict[str, float] = defaultdict(float)
        started = time.perf_counter()
        for micro in range(accum):
            waited = time.perf_counter()
            batch = next(batches)
            totals["data_wait_s"] += time.perf_counter() - waited   # the loader did not keep up for this long
            batch = to_device(batch, engine.device)
            rand = BatchRandom(cfg.run.seed, self.step, micro, engine.rank, engine.world_size,
                               len(batch["id"]), engine.device)
            with engine.accumulate(sync=micro == accum - 1):
                with engine.autocast():
                    loss, metrics = self.task.compute(self.model, batch, rand, self.step)
                engine.backward(loss / accum)
            for k, v in metrics.items():
                totals[k] += v / accum
        agreed = engine.all_reduce_mean({"finite": float(math.isfinite(totals["loss"])),
                                         "stop": float(self.stop.requested)})   # one collective for both
        loss_ok, self.stop_agreed = agreed["finite"] == 1.0, agreed["stop"] > 0
        grad_norm, applied = engine.step(cfg.optim.clip_grad_norm, skip=not loss_ok)
        totals["grad_norm"] = grad_norm if math.isfinite(grad_norm) else 0.0
        totals["step_s"] = time.perf_counter() - started
        return dict(totals), applied

    def save(self) -> None:
        loader_state = self.loader.state_dict()
        derived = self.task.derived()
        self.evaluator.flush_plots()
        ckpt.save_checkpoint(self.engine, self.run_dir / "checkpoints", self.step, ema=self.ema,
                             loader_state=loader_state, config=self.cfg,
                             meta_extra={"mlflow_run_id": self.tracker_run_id, "derived": derived,
                                         "resolved_from": self.resolved_from},
                             metric=self.best_metric_candidate, keep_last=self.cfg.run.keep_last)

    def data_counts(self) -> dict[str, float]:
        """The loader's integrity counters summed over ranks (corrupt samples, short shards, ...)."""
        counts = self.loader.counts()
        keys = sorted(counts)
        summed = self.engine.all_reduce_sum(torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64,
                                                         device=self.engine.device))
        return {f"data_{k}": float(v) for k, v in zip(keys, summed.tolist())}

    def fit(self) -> dict[str, Any]:
        cfg, engine = self.cfg, self.engine
        guard = NonFiniteGuard(cfg.run.nan_guard)
        window = MetricWindow()
        samples_per_step = cfg.data.batch_size * cfg.optim.grad_accum * engine.world_size
        progress = Progress(cfg, self.step, engine.is_main and cfg.run.progress)
        batches = iter(self.loader)
        tic = time.perf_counter()
        first_step = True
        while self.step < cfg.run.max_steps:
            metrics, applied = self.optimizer_step(batches)
            if first_step:  # compilation (engine.compile) happens here: report it apart from step time
                first_step, warmup_s, tic = False, time.perf_counter() - tic, time.perf_counter()
                self.tracker.log_metrics({"warmup_s": warmup_s}, self.step + 1)
                progress.note(f"first step (compile warm-up included): {warmup_s:.1f} s")
            guard.update(applied, self.step)
            if applied and self.ema is not None:
                self.ema.update(self.step + 1)   # n-th optimiser step, n from 1 (EMA warm-up)
            self.losses[self.step] = metrics["loss"]
            window.add(metrics)
            self.step += 1
            progress.update()
            if self.step % cfg.run.log_every == 0 or self.step == cfg.run.max_steps:
                elapsed, tic = time.perf_counter() - tic, time.perf_counter()
                logged = window.reduce(engine)
                logged["data_wait"] = logged.pop("data_wait_s") / max(logged.pop("step_s"), 1e-9)
                logged.update(self.data_counts())
                logged.update(lr=engine.lr(), skipped_steps=float(guard.skipped),
                              samples_per_s=samples_per_step * cfg.run.log_every / max(elapsed, 1e-9))
                self.best_metric_candidate = logged["loss"]
                self.tracker.log_metrics(logged, self.step)
                progress.log(self.step, logged)
            if cfg.run.eval_every and self.step % cfg.run.eval_every == 0 and self.step < cfg.run.max_steps:
                self.evaluator.run(self.step, self.ema)
                tic = time.perf_counter()  # samples/s measures training only
            if self.step % cfg.run.ckpt_every == 0 or self.step == cfg.run.max_steps or self.stop_agreed:
                self.save()
                tic = time.perf_counter()
            if self.stop_agreed:
                break
        progress.close()
        final = None if self.stop_agreed else self.evaluator.run(self.step, self.ema)
        return {"step": self.step, "losses": dict(self.losses), "skipped_steps": guard.skipped,
                "mlflow_run_id": self.tracker_run_id, "eval": final, "data": self.data_counts(),
                "preempted": self.stop.signal_name or ("another rank's stop signal" if self.stop_agreed else None)}


def setup(cfg: TrainConfig, engine: Engine, resolved_from: dict[str, str] | None = None) -> Trainer:
    seed_everything(cfg.run.seed, engine.rank)
    run_dir = Path(cfg.run.dir)
    task = make_task(cfg, engine.device)
    make_loader = partial(build_loader, cfg, task, engine)
    found = ckpt.resolve_resume(run_dir / "checkpoints", cfg.run.resume) if engine.is_main else None
    resume = engine.broadcast_object(str(found) if found else None)
    if resume:
        task.restore(ckpt.read_meta(Path(resume))["derived"])
    task.prepare(make_loader, engine)
    model = engine.prepare(task.objective, partial(make_optimizer, cfg=cfg.optim),
                           partial(make_scheduler, cfg=cfg.optim, max_steps=cfg.run.max_steps))
    ema = engine.make_ema(cfg.ema.decay) if cfg.ema.enabled else None
    loader = make_loader()
    step, run_id = 0, None
    if resume:
        meta, loader_state = ckpt.load_checkpoint(engine, Path(resume), ema=ema)
        if loader_state is not None:
            loader.load_state_dict(loader_state)
        step, run_id = meta["step"], meta.get("mlflow_run_id")
    if engine.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml", resolved_header(resolved_from or {}))
    tracker = Tracker(run_dir, enabled=engine.is_main)
    run_id = engine.broadcast_object(tracker.start(cfg, run_id))
    tracker.set_tags({"shapeflow.world_size": engine.world_size, "shapeflow.strategy": engine.strategy,
                      "shapeflow.launcher": engine.launch.launcher,
                      **{f"shapeflow.resolved_from.{k}": v for k, v in (resolved_from or {}).items()}})
    if engine.is_main:
        tracker.log_artifact(run_dir / "config.yaml")
    evaluator = Evaluator(cfg, task, engine, tracker, make_loader)
    trainer = Trainer(cfg, engine, task, model, ema, loader, tracker, evaluator, step=step)
    trainer.tracker_run_id, trainer.resolved_from = run_id, dict(resolved_from or {})
    return trainer


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training job ``cfg``; returns a summary (final step, per-step losses, ...).

    The engine settings are resolved from every source first (trainer/engines/resolve.py), so the
    config saved in run.dir, the checkpoints and MLflow is the one that runs."""
    cfg, resolved_from = resolve_run_config(cfg)
    engine = create_engine(cfg.engine, cfg.precision, cfg.optim)
    trainer, tracker, finished = None, None, False
    stop = StopRequest()   # caught from here on: a signal during set-up stops after the first step
    try:
        with stop:
            trainer = setup(cfg, engine, resolved_from)
            trainer.stop, tracker = stop, trainer.tracker
            summary = trainer.fit()
        tracker.finish("KILLED" if summary["preempted"] else "FINISHED")
        finished = True
        return summary
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    finally:
        if trainer is not None and hasattr(trainer.loader, "close"):
            trainer.loader.close()   # joins its dataloader workers now, not at interpreter exit
        engine.close(orderly=finished)   # after an error no barrier: the peers may be gone
