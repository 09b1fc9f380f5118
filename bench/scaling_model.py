"""Weak-scaling model: step time, throughput, efficiency and data rate from 1 to 64 nodes x 8 GPUs.

    python bench/scaling_model.py --preset vecset_dit/large --nodes 64 [--gpu h200] [--batch 4]
    python bench/scaling_model.py --validate      # predicted vs measured collective bytes (2 gloo processes)

Measured here: FLOPs of one training step (forward + backward of the network, counted by
torch.utils.flop_counter on meta tensors, so a 1.2B model costs no memory), the parameter count, and
(``--validate``) the bytes each rank hands to collectives per step under every strategy
(bench/comm_counter.py around 2-process gloo runs of bench/bench_strategies.py). Stated: the hardware
figures of HARDWARE (each with its source; override with flags). docs/scaling.md explains the terms
and records the validation.

Per GPU and step (weak scaling: the per-GPU batch stays fixed as nodes are added):
  compute   = FLOPs / (peak bf16 x MFU)
  comm      = sum over the strategy's collectives of payload S (bytes, COLLECTIVES below):
              intra-node ring over NVLink  k (g-1)/g S / B_nvlink, then across nodes on the GPU's own
              NIC (one rail per GPU, as NCCL's rings use them)  k (n-1)/n (S/g) / B_ib,
              k = 2 for all-reduce, 1 for all-gather / reduce-scatter; g GPUs per node, n nodes
  optimizer = Adam update bytes of the local parameter shard / HBM bandwidth
  data      = per-node samples x loader bytes per sample / storage bandwidth per node, which is
              min(per-node figure, aggregate / nodes) (the loader prefetches: it overlaps the GPU work)
  step      = max(data, compute + comm + optimizer)            without overlap
              max(data, max(compute, comm) + optimizer)        with overlap (buckets / prefetch hide comm)
Collective latency (alpha terms) is not modelled: large buckets keep it small (docs/scaling.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import models  # noqa: E402

NODE_COUNTS = (1, 2, 8, 16, 32, 64)
GPUS_PER_NODE = 8
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp2")


@dataclass(frozen=True)
class Hardware:
    """Stated figures (not measured here); docs/scaling.md gives each one's source."""
    name: str
    peak_bf16: float        # dense bf16 tensor-core FLOP/s per GPU (datasheet, no sparsity)
    mfu: float              # fraction of peak a well-tuned transformer step achieves
    hbm: float              # bytes/s per GPU (datasheet)
    nvlink: float           # achievable ring bus bandwidth per GPU inside a node, bytes/s
    ib: float               # achievable bandwidth per GPU to other nodes (one 400 Gb/s NDR NIC per GPU)
    storage: float          # shared file system / object store read bandwidth per node, bytes/s
    storage_total: float = 0.0   # the file system's aggregate read bandwidth, bytes/s (0: no limit)


HARDWARE = {
    # H100 SXM5 datasheet: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, NVLink 4 900 GB/s (both directions)
    "h100": Hardware("H100 SXM", 989e12, 0.40, 3.35e12, 360e9, 45e9, 5e9),
    # H200 SXM datasheet: same compute and NVLink as H100, 4.8 TB/s HBM3e
    "h200": Hardware("H200 SXM", 989e12, 0.40, 4.8e12, 360e9, 45e9, 5e9),
}


@dataclass(frozen=True)
class Workload:
    preset: str
    batch: int              # samples per GPU per step
    flops: float            # one training step of the network on one GPU (forward + backward)
    params: int
    sample_bytes: float     # loader bytes read from storage per sample


# ---------------------------------------------------------------------------
# measured quantities
# ---------------------------------------------------------------------------

def preset_inputs(preset: str, batch: int, cfg) -> tuple:
    """Meta-tensor inputs of one training step (shapes follow the presets' anchors)."""
    family = preset.partition("/")[0]
    if family == "vecset_dit":
        tokens = 4096 if preset.endswith("large") else 2048  # latent tokens of the matching VAE preset
        cond = torch.randn(batch, 1370, cfg.condition_dim) if cfg.condition == "tokens" else None  # DINOv2-L 518 px
        return torch.randn(batch, tokens, cfg.in_channels), torch.rand(batch), cond
    if family == "vecset_vae":
        points = lambda n: torch.rand(batch, n, 3)  # noqa: E731
        # VAE loader options: 4096 surface + 4096 sharp points, 1024 volume + 1024 near queries
        return points(4096), points(4096), points(2048), points(4096), points(4096)
    raise ValueError(f"scaling_model: no workload for {preset!r} (vecset_dit/* and vecset_vae/* are modelled)")


def step_flops(preset: str, batch: int) -> tuple[float, int]:
    """(FLOPs of forward + backward, parameter count) counted on meta tensors."""
    cfg = models.config_for(preset)
    with torch.device("meta"):
        model = models.build_from_config(cfg)
        inputs = preset_inputs(preset, batch, cfg)
        with FlopCounterMode(display=False) as counter:
            out = model(*inputs)
            out = out[0] if isinstance(out, tuple) else out
            out.float().square().mean().backward()
    return float(counter.get_total_flops()), sum(p.numel() for p in model.parameters())


def default_sample_bytes(preset: str) -> float:
    """Loader bytes per sample at the preprocessing defaults (docs/scaling.md, bench/bench_loader.py).

    VAE: the members it reads, whole: surface + normals + FPS order (100k x 9 B + 16k x 4 B), sharp
    likewise (50k), volume (100k x 8 B), near (2 x 100k x 8 B). DiT: cached float16 latents
    (tokens x 64 x 2 B) plus one condition view (assumed 150 kB PNG)."""
    if preset.startswith("vecset_vae"):
        return 100_000 * 9 + 16_384 * 4 + 50_000 * 9 + 16_384 * 4 + 100_000 * 8 + 200_000 * 8
    tokens = 4096 if preset.endswith("large") else 2048
    return tokens * 64 * 2 + 150e3


def measure_workload(preset: str, batch: int, sample_bytes: float | None) -> Workload:
    flops, params = step_flops(preset, batch)
    return Workload(preset, batch, flops, params,
                    default_sample_bytes(preset) if sample_bytes is None else sample_bytes)


# ---------------------------------------------------------------------------
# strategies: collectives per step and their payloads
# ---------------------------------------------------------------------------

def collectives(strategy: str, params: int, precision: str = "bf16") -> list[tuple[str, float]]:
    """(kind, payload bytes) per step and rank, as each engine issues them (see docs/scaling.md).

    bf16: DDP keeps fp32 parameters under autocast, so its gradient buckets are fp32; DeepSpeed
    holds bf16 parameters and reduces bf16 gradients; FSDP2 gathers bf16 parameters and reduces fp32
    gradients (its MixedPrecisionPolicy). DeepSpeed ZeRO-2 all-reduces gradient buckets (measured: its
    default use_multi_rank_bucket_allreduce), then all-gathers the updated parameters. ZeRO-3 and FSDP2
    (reshard after forward) gather the parameters for forward and again for backward (ZeRO-3 only where zero3_regather says)."""
    half = 2 if precision == "bf16" else 4
    table = {
        "ddp": [("all_reduce", 4 * params)],
        # DeepSpeed >= 0.13 default use_multi_rank_bucket_allreduce: gradient buckets are all-reduced
        "zero2": [("all_reduce", half * params), ("all_gather", half * params)],
        "zero3": [("all_gather", half * params), ("all_gather", half * params * zero3_regather(params)),
                  ("reduce_scatter", half * params)],
        "fsdp2": [("all_gather", half * params), ("all_gather", half * params), ("reduce_scatter", 4 * params)],
    }
    return table[strategy]


ZERO3_MAX_REUSE_DISTANCE = 1e9   # DeepSpeed default stage3_max_reuse_distance (parameter elements)


def zero3_regather(params: int, reuse_distance: float = ZERO3_MAX_REUSE_DISTANCE) -> float:
    """Fraction of the parameters ZeRO-3 gathers again for backward. A parameter stays gathered when
    it is used again within ``reuse_distance`` parameters; block i of a stack (depth fraction x) is
    reused after about 2 (1 - x) P parameters (the later blocks' forward and backward), so the first
    1 - R / 2P of the stack is released and re-gathered (measured: a small model gathers once)."""
    return max(0.0, 1.0 - reuse_distance / (2 * params))


def sharded_fraction(strategy: str, world: int) -> float:
    """Fraction of the optimiser state a rank updates."""
    return 1.0 if strategy == "ddp" else 1.0 / world


def comm_seconds(kind: str, payload: float, nodes: int, hw: Hardware) -> float:
    """Hierarchical ring: intra-node over NVLink, then across nodes on each GPU's own NIC."""
    k = 2 if kind == "all_reduce" else 1
    g = GPUS_PER_NODE
    intra = k * (g - 1) / g * payload / hw.nvlink
    inter = k * (nodes - 1) / nodes * (payload / g) / hw.ib
    return intra + inter


# ---------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------

ADAM_BYTES_PER_PARAM = 30   # read fp32 param, grad, m, v (16 B), write param, m, v (12 B), bf16 copy (2 B)


def predict(w: Workload, strategy: str, nodes: int, hw: Hardware, overlap: bool) -> dict:
    world = nodes * GPUS_PER_NODE
    compute = w.flops / (hw.peak_bf16 * hw.mfu)
    comm = sum(comm_seconds(kind, s, nodes, hw) for kind, s in collectives(strategy, w.params))
    optimizer = w.params * sharded_fraction(strategy, world) * ADAM_BYTES_PER_PARAM / hw.hbm
    node_samples = w.batch * GPUS_PER_NODE
    node_storage = min(hw.storage, hw.storage_total / nodes) if hw.storage_total else hw.storage
    data = node_samples * w.sample_bytes / node_storage
    gpu = (max(compute, comm) if overlap else compute + comm) + optimizer
    step = max(data, gpu)
    ideal = compute + w.params * ADAM_BYTES_PER_PARAM / hw.hbm / GPUS_PER_NODE  # one node, no comm, no I/O limit
    return {"strategy": strategy + (" +overlap" if overlap else ""), "nodes": nodes, "gpus": world,
            "compute_s": compute, "comm_s": comm, "optimizer_s": optimizer, "data_s": data, "step_s": step,
            "samples_per_s": w.batch * world / step, "efficiency": ideal / step,
            "node_GBps_needed": node_samples * w.sample_bytes / min(step, gpu) / 1e9,
            "dominant": max(("compute", compute), ("comm", comm), ("optimizer", optimizer), ("data", data),
                            key=lambda kv: kv[1])[0]}


def table(w: Workload, hw: Hardware, node_counts) -> str:
    lines = [f"{w.preset}: {w.params / 1e6:.0f}M parameters, batch {w.batch}/GPU, "
             f"{w.flops / w.batch / 1e12:.2f} TFLOP per sample (fwd+bwd), {w.sample_bytes / 1e6:.2f} MB read "
             f"per sample; {hw.name}: {hw.peak_bf16 / 1e12:.0f} TFLOP/s x MFU {hw.mfu}, NVLink "
             f"{hw.nvlink / 1e9:.0f} GB/s, IB {hw.ib / 1e9:.0f} GB/s per GPU, storage {hw.storage / 1e9:.1f} GB/s "
             f"per node",
             "| strategy | nodes | GPUs | compute s | comm s | optim s | data s | step s | samples/s | "
             "efficiency | GB/s per node needed | dominant |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for strategy in STRATEGIES:
        for overlap in (False, True):
            for nodes in node_counts:
                r = predict(w, strategy, nodes, hw, overlap)
                lines.append(f"| {r['strategy']} | {nodes} | {r['gpus']} | {r['compute_s']:.3f} | {r['comm_s']:.3f} | "
                             f"{r['optimizer_s']:.4f} | {r['data_s']:.3f} | {r['step_s']:.3f} | "
                             f"{r['samples_per_s']:.0f} | {r['efficiency']:.2f} | {r['node_GBps_needed']:.2f} | "
                             f"{r['dominant']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# validation against 2-process gloo runs
# ---------------------------------------------------------------------------

BENCH_NAMES = {"ddp": "ddp", "zero2": "zero2", "zero3": "zero3", "fsdp2": "fsdp2"}


def measured_bytes(strategies, width: int, depth: int, precision: str) -> dict[str, dict]:
    """Per strategy: {"params": P, "bytes": payload bytes per step and rank} from 2-process gloo runs."""
    sys.path.insert(0, str(REPO / "bench"))
    import bench_strategies

    args = argparse.Namespace(nproc=2, width=width, depth=depth, tokens=16, batch=2, steps=3,
                              precision=precision, compile=False, count_comm=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        zero3 = json.loads((REPO / "configs/deepspeed/zero3.json").read_text())
        zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
        (tmp / "zero3_all.json").write_text(json.dumps(zero3))
        for strategy in strategies:
            reports = bench_strategies.run_strategy(BENCH_NAMES[strategy], args, tmp)
            steps = reports[0]["comm"]
            results[strategy] = {"bytes": sum(sum(s.values()) for s in steps) / len(steps),
                                 "by_collective": steps[-1]}
    return results


def validation_params(width: int, depth: int) -> int:
    with torch.device("meta"):
        net = models.build("vecset_dit/base", width=width, depth=depth, heads=width // 64,
                           condition="none", in_channels=64)
    return sum(p.numel() for p in net.parameters())


def validate(strategies, width: int = 128, depth: int = 2, precision: str = "bf16") -> list[dict]:
    params = validation_params(width, depth)
    rows = []
    for strategy, got in measured_bytes(strategies, width, depth, precision).items():
        predicted = sum(s for _, s in collectives(strategy, params, precision))
        rows.append({"strategy": strategy, "params": params, "predicted": predicted, "measured": got["bytes"],
                     "ratio": got["bytes"] / predicted, "by_collective": got["by_collective"]})
    return rows


def print_validation(rows) -> bool:
    print("| strategy | params | predicted bytes/step | measured bytes/step | measured/predicted |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['params']} | {r['predicted']:.0f} | {r['measured']:.0f} | {r['ratio']:.3f} |")
    return all(abs(r["ratio"] - 1) <= 0.10 for r in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vecset_dit/large")
    parser.add_argument("--nodes", type=int, default=64, help="largest node count in the table")
    parser.add_argument("--batch", type=int, default=4, help="samples per GPU per step")
    parser.add_argument("--gpu", choices=sorted(HARDWARE), default="h100")
    parser.add_argument("--mfu", type=float)
    parser.add_argument("--storage-gbps", type=float, help="storage read GB/s per node")
    parser.add_argument("--storage-total-gbps", type=float, help="aggregate storage GB/s of the cluster")
    parser.add_argument("--ib-gbps", type=float, help="inter-node GB/s per GPU")
    parser.add_argument("--sample-mb", type=float, help="loader MB read per sample (e.g. bytes_read/samples)")
    parser.add_argument("--validate", action="store_true", help="2-process gloo runs vs predicted bytes")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args(argv)
    if args.validate:
        return 0 if print_validation(validate(args.strategies.split(","))) else 1
    hw = HARDWARE[args.gpu]
    hw = replace(hw, mfu=args.mfu or hw.mfu, storage=(args.storage_gbps or hw.storage / 1e9) * 1e9,
                 ib=(args.ib_gbps or hw.ib / 1e9) * 1e9, storage_total=(args.storage_total_gbps or 0) * 1e9)
    workload = measure_workload(args.preset, args.batch, args.sample_mb and args.sample_mb * 1e6)
    print(table(workload, hw, [n for n in NODE_COUNTS if n <= args.nodes]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
