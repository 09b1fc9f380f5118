"""Benchmark the VecSet VAE and the VecSet DiT on this machine (CPU by default).

Reports, for one forward+backward step:
  * time (best of --repeats; the CPU is shared, so the minimum is the least disturbed run);
  * FLOPs counted by torch.utils.flop_counter.FlopCounterMode (matmuls and attention) and the
    achieved FLOP/s as a fraction of a matmul peak measured in the same run (best of square
    fp32 matmuls, so the ratio is machine-independent);
  * peak activation memory with and without activation checkpointing at 24 layers.

How memory is measured (CPU has no allocator statistics):
  peak: the step runs under torch.profiler with profile_memory=True; the profiler's memory
        timeline (torch.profiler._memory_profiler.MemoryProfile, the data behind
        profile.export_memory_timeline) lists every tensor allocation and free during the
        step. Parameters, their .grad buffers (allocated by a warm-up step) and inputs exist
        before the step, so the running sum of allocations minus frees peaks at the step's
        activation + temporary memory, including the recomputation inside backward.
  saved: bytes of distinct storages that autograd saves for backward during the forward
         (torch.autograd.graph.saved_tensors_hooks), i.e. what lives between forward and
         backward. Public API; a cross-check of the first number.

With --compile, each throughput model is timed eagerly and then after trainer.compile_model
(regional torch.compile); the compile warm-up (first compiled step) is reported on its own.
--device cuda --bf16 runs on a GPU under bf16 autocast (SDPA picks flash attention) and states the
fraction of peak as MFU against --peak-tflops (bench/gpu.sh).

Usage:  python bench/bench_models.py [--repeats 3] [--threads 1] [--skip-memory] [--quick] [--compile]
                                     [--device cuda --bf16 --peak-tflops 989] [--json out.json]

The peak and the steps use the same thread count (1 by default): with other jobs on the two
cores, multi-threaded timings swing by 3x between runs while single-thread ratios stay put.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
import trainer  # noqa: E402

DEVICE = torch.device("cpu")   # set by --device
AUTOCAST = False               # set by --bf16
PEAK_FLOPS = 0.0               # set by --peak-tflops (GPU datasheet peak; 0: measure a matmul)


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------

def matmul_peak(repeats: int, sizes=(1024, 2048)) -> float:
    """Best FLOP/s of square matmuls (2 n^3 FLOPs each); fp32, or bf16 with --bf16; or the
    --peak-tflops datasheet value on a GPU (then the fraction of peak is MFU)."""
    if PEAK_FLOPS:
        return PEAK_FLOPS
    best = 0.0
    dtype = torch.bfloat16 if AUTOCAST else torch.float32
    for n in sizes:
        a, b = torch.randn(n, n, device=DEVICE, dtype=dtype), torch.randn(n, n, device=DEVICE, dtype=dtype)
        a @ b
        for _ in range(repeats):
            best = max(best, 2 * n**3 / timed(lambda a=a, b=b: a @ b))
    return best


def timed(step) -> float:
    start = time.perf_counter()
    step()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_time(step, repeats: int) -> float:
    step()  # warm-up (allocations, kernel selection)
    return min(timed(step) for _ in range(repeats))


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def peak_step_memory(step) -> int:
    """Peak bytes allocated during one step above what existed before it (see module doc)."""
    from torch.profiler._memory_profiler import Action, MemoryProfile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        step()
    live = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def saved_for_backward_bytes(forward) -> int:
    """Bytes of distinct storages saved by autograd during ``forward()`` (parameters excluded)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if not isinstance(t, torch.nn.Parameter):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------

def dit_workload(width, depth, heads, tokens, batch, cond_tokens, channels=64, cond_dim=1024):
    torch.manual_seed(0)
    model = models.build("vecset_dit/base", width=width, depth=depth, heads=heads, in_channels=channels,
                         condition_dim=cond_dim).to(DEVICE)
    x = torch.randn(batch, tokens, channels, device=DEVICE)
    t, cond = torch.rand(batch, device=DEVICE), torch.randn(batch, cond_tokens, cond_dim, device=DEVICE)
    forward = lambda: model(x, t, cond)  # noqa: E731
    return model, forward, dict(width=width, depth=depth, heads=heads, tokens=tokens, batch=batch,
                                cond_tokens=cond_tokens)


def vae_workload(width, depth, heads, latents, queries, points, batch):
    torch.manual_seed(0)
    model = models.build("vecset_vae/base", width=width, heads=heads, decoder_layers=depth, encoder_layers=0,
                         num_latents=latents, num_sharp_latents=0).to(DEVICE)
    pts, normals = torch.rand(batch, points, 3, device=DEVICE) * 2 - 1, torch.randn(batch, points, 3, device=DEVICE)
    xyz = torch.rand(batch, queries, 3, device=DEVICE) * 2 - 1
    forward = lambda: model(pts, normals, xyz)[0]  # noqa: E731
    return model, forward, dict(width=width, decoder_layers=depth, heads=heads, latents=latents,
                                queries=queries, points=points, batch=batch)


def make_step_untimed(model, forward):
    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=AUTOCAST):
            out = forward()
        out.float().square().mean().backward()
    return step


def make_step(model, forward):
    step = make_step_untimed(model, forward)
    step()  # allocates .grad so later steps only accumulate into it
    return step


def throughput(name, workload, peak, repeats):
    """Step FLOP/s against the overall matmul peak, and the median of paired ratios: each
    timed step is bracketed by matmul timings, so load changes by other jobs hit both sides."""
    model, forward, shape = workload
    step = make_step(model, forward)
    flops = count_flops(step)
    seconds, paired = [], []
    for _ in range(repeats):
        before = matmul_peak(1, sizes=(2048,))
        seconds.append(best_time(step, 1))
        local_peak = max(before, matmul_peak(1, sizes=(2048,)))
        paired.append(flops / seconds[-1] / local_peak)
        peak = max(peak, local_peak)
    params = sum(p.numel() for p in model.parameters())
    return dict(name=name, shape=shape, params=params, flops=flops, seconds=min(seconds),
                flops_per_s=flops / min(seconds), fraction_of_peak=flops / min(seconds) / peak,
                paired_fraction_median=statistics.median(paired), peak=peak)


def compiled_throughput(row, workload, repeats):
    """Add the step time after trainer.compile_model to a throughput row (warm-up timed apart)."""
    model, forward, _ = workload
    trainer.compile_model(model)
    step = make_step_untimed(model, forward)
    row["compile_warmup_s"] = timed(step)
    row["compiled_seconds"] = min(timed(step) for _ in range(repeats))
    row["compile_speedup"] = row["seconds"] / row["compiled_seconds"]
    return row


def memory(name, workload, repeats, every_values=(0, 1, 2)):
    model, forward, shape = workload
    step = make_step(model, forward)
    rows = []
    for every in every_values:
        model.set_activation_checkpointing(every)
        rows.append(dict(every=every, peak_bytes=peak_step_memory(step),
                         saved_bytes=saved_for_backward_bytes(forward), seconds=best_time(step, repeats)))
    return dict(name=name, shape=shape, rows=rows)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def report(results) -> str:
    mib = lambda b: b / 2**20  # noqa: E731
    lines = [f"matmul peak (fp32, best square matmul): {results['matmul_peak'] / 1e9:.1f} GFLOP/s", "",
             "| model | shape | params | GFLOP/step | best step s | GFLOP/s | best / best matmul | "
             "median paired ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in results["throughput"]:
        lines.append(f"| {r['name']} | {r['shape']} | {r['params'] / 1e6:.1f}M | {r['flops'] / 1e9:.1f} | "
                     f"{r['seconds']:.3f} | {r['flops_per_s'] / 1e9:.1f} | {r['fraction_of_peak']:.2f} | "
                     f"{r['paired_fraction_median']:.2f} |")
    compiled = [r for r in results["throughput"] if "compiled_seconds" in r]
    if compiled:
        lines += ["", "| model | eager step s | compiled step s | speedup | compiled fraction of peak | "
                  "compile warm-up s |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['seconds']:.3f} | {r['compiled_seconds']:.3f} | {r['compile_speedup']:.2f}x | "
                  f"{r['flops'] / r['compiled_seconds'] / results['matmul_peak']:.2f} | {r['compile_warmup_s']:.1f} |"
                  for r in compiled]
    lines += ["", "| model | shape | checkpoint_every | peak activation MiB | saved-for-backward MiB | "
              "reduction vs off | step s |", "|---|---|---|---|---|---|---|"]
    for m in results["memory"]:
        base = m["rows"][0]["peak_bytes"]
        for row in m["rows"]:
            lines.append(f"| {m['name']} | {m['shape']} | {row['every']} | {mib(row['peak_bytes']):.1f} | "
                         f"{mib(row['saved_bytes']):.1f} | {base / row['peak_bytes']:.1f}x | {row['seconds']:.3f} |")
    return "\n".join(lines)


def add_memory_results(results, s, repeats):
    results["memory"].append(memory("vecset_dit", dit_workload(256 // s, 24, 4, 512 // s, 2, 64 // s), repeats))
    results["memory"].append(memory("vecset_vae", vae_workload(256 // s, 24, 4, 512 // s, 1024 // s, 2048 // s, 2),
                                    repeats))



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (best is kept)")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run, numbers not meaningful)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--skip-memory", action="store_true", help="only the time / FLOP/s part")
    parser.add_argument("--compile", action="store_true",
                        help="also time each model after trainer.compile_model (warm-up reported apart)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (flash attention on a GPU)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="datasheet dense peak of the accelerator: fraction of peak becomes MFU")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on shared cores one thread gives stable ratios; "
                             "0 keeps torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    global DEVICE, AUTOCAST, PEAK_FLOPS
    DEVICE, AUTOCAST, PEAK_FLOPS = torch.device(args.device), args.bf16, args.peak_tflops * 1e12
    s = 4 if args.quick else 1  # shrink factor

    peak = matmul_peak(args.repeats)
    results = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor()
                   or platform.machine(), matmul_peak=peak, throughput=[], memory=[])
    workloads = {"vecset_dit": lambda: dit_workload(1024 // s, 2, 16 // s, 512 // s, 2, 128 // s),
                 "vecset_vae": lambda: vae_workload(1024 // s, 2, 16 // s, 512 // s, 2048 // s, 4096 // s, 1)}
    for name, make in workloads.items():
        workload = make()
        row = throughput(name, workload, peak, args.repeats)
        results["throughput"].append(compiled_throughput(row, workload, args.repeats) if args.compile else row)
    peak = results["matmul_peak"] = max(r["peak"] for r in results["throughput"])
    for r in results["throughput"]:
        r["fraction_of_peak"] = r["flops_per_s"] / peak
    if not args.skip_memory:
        add_memory_results(results, s, args.repeats)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
