"""Step time and per-rank parameter + optimiser memory of each engine strategy (2 processes).

    python bench/bench_strategies.py [--nproc 2] [--width 512 --depth 8 --tokens 256 --batch 2 --steps 6]
                                     [--precision bf16] [--compile]

For each strategy (DDP, ZeRO-1, ZeRO-2, ZeRO-2 + optimizer offload, ZeRO-3, FSDP2) one torchrun job
trains a VecSet DiT (the vecset_dit/base preset with width/depth overrides) on random latents through
the engine seam (prepare, autocast, backward, step, as the loop does) and reports the median step
time after one warm-up step and the bytes of parameters and optimiser state each rank holds
(``Engine.memory_report``). Printed as a table with ratios to DDP, the machine-independent part.
ZeRO-3 runs with stage3_param_persistence_threshold 0 (every parameter partitioned) and with the
bundled configs/deepspeed/zero3.json (parameters under 1e5 values stay whole on every rank).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = {
    "ddp": ["engine.strategy=ddp"],
    "zero1": ["engine.strategy=deepspeed", "engine.zero_stage=1"],
    "zero2": ["engine.strategy=deepspeed", "engine.zero_stage=2"],
    "zero2_offload": ["engine.strategy=deepspeed", "engine.zero_stage=2", "engine.offload=optimizer"],
    "zero3": ["engine.strategy=deepspeed", "engine.zero_stage=3", "engine.deepspeed_config={zero3_all}"],
    "zero3_bundled": ["engine.strategy=deepspeed", "engine.zero_stage=3"],
    "fsdp2": ["engine.strategy=fsdp2"],
}


def worker(args: argparse.Namespace) -> None:
    """One rank: build the engine from overrides, train ``steps`` steps on random latents, report."""
    import torch

    sys.path.insert(0, str(REPO))
    import models
    from trainer.config import load_train_config
    from trainer.engines import create_engine
    from trainer.loop import make_optimizer, make_scheduler
    from trainer.tasks import DitObjective

    torch.set_num_threads(1)
    if args.count_comm:
        sys.path.insert(0, str(REPO / "bench"))
        import comm_counter
        comm_counter.install()
    cfg = load_train_config(None, ["task=vae", "data.path=unused", f"precision={args.precision}",
                                   f"engine.compile={str(args.compile).lower()}", *json.loads(args.overrides)])
    engine = create_engine(cfg.engine, cfg.precision, cfg.optim)
    torch.manual_seed(0)
    net = models.build("vecset_dit/base", width=args.width, depth=args.depth, heads=args.width // 64,
                       condition="none", in_channels=64)
    model = engine.prepare(DitObjective(net), partial(make_optimizer, cfg=cfg.optim),
                           partial(make_scheduler, cfg=cfg.optim, max_steps=1000))
    if args.count_comm and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        comm_counter.count_ddp(model)
    gen = torch.Generator().manual_seed(engine.rank)
    times, comm = [], []
    for _ in range(args.steps):
        x0, eps = (torch.randn(args.batch, args.tokens, 64, generator=gen).to(engine.device) for _ in range(2))
        t = torch.rand(args.batch, generator=gen).to(engine.device)
        tic = time.perf_counter()
        with engine.accumulate(sync=True):
            with engine.autocast():
                loss = model(x0, eps, t, None, torch.zeros(args.batch, dtype=torch.bool, device=engine.device)).mean()
            engine.backward(loss)
        engine.step(1.0)
        engine.barrier()
        times.append(time.perf_counter() - tic)
        comm.append(comm_counter.reset() if args.count_comm else {})
    report = {"step_s": statistics.median(times[1:]), **engine.memory_report(), "comm": comm[1:],
              "params": sum(p.numel() for p in net.parameters()) if engine.strategy != "deepspeed" else None}
    reports = engine.gather_objects(report)
    if engine.is_main:
        Path(args.out).write_text(json.dumps(reports))
    engine.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_strategy(name: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    out = tmp / f"{name}.json"
    overrides = [o.format(zero3_all=tmp / "zero3_all.json") for o in STRATEGIES[name]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker",
           "--overrides", json.dumps(overrides), "--out", str(out), "--width", str(args.width),
           "--depth", str(args.depth), "--tokens", str(args.tokens), "--batch", str(args.batch),
           "--steps", str(args.steps), "--precision", args.precision,
           *(["--compile"] if args.compile else []), *(["--count-comm"] if getattr(args, "count_comm", False) else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="per rank")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--compile", action="store_true", help="engine.compile=true (regional torch.compile); "
                        "the first, compiling step is excluded from the median as the warm-up")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count-comm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        zero3 = json.loads((REPO / "configs/deepspeed/zero3.json").read_text())
        zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (tmp / "zero3_all.json").write_text(json.dumps(zero3))
        results = {name: run_strategy(name, args, tmp) for name in args.strategies.split(",")}
    base = results.get("ddp")
    print(f"vecset_dit width {args.width} depth {args.depth}, {args.tokens} tokens, batch {args.batch}/rank, "
          f"{args.nproc} processes, {args.precision}, params {results['ddp'][0]['params'] if base else '?'}")
    print("| strategy | step s (median) | param MB / rank | optimizer MB / rank | param+opt vs DDP | step time vs DDP |")
    print("|---|---|---|---|---|---|")
    for name, reports in results.items():
        step = max(r["step_s"] for r in reports)
        mem = max(r["param_bytes"] + r["optimizer_bytes"] for r in reports)
        p_mb = max(r["param_bytes"] for r in reports) / 2**20
        o_mb = max(r["optimizer_bytes"] for r in reports) / 2**20
        if base:
            base_step = max(r["step_s"] for r in base)
            base_mem = max(r["param_bytes"] + r["optimizer_bytes"] for r in base)
            ratios = f"{mem / base_mem:.2f} | {step / base_step:.2f}"
        else:
            ratios = "- | -"
        print(f"| {name} | {step:.3f} | {p_mb:.1f} | {o_mb:.1f} | {ratios} |")


if __name__ == "__main__":
    main()
