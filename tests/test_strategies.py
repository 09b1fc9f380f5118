"""DDP, ZeRO-1/2/3 and FSDP2 on 2 CPU processes (gloo) against one process on the same global batches.

One torchrun per strategy (tests/strategy_worker.py) takes one SGD step per task (VAE, DiT) and
accumulation setting on batches from each rank's own make_loader and compares the applied update with
the one-process autograd gradient of the same global batch; it also trains a few AdamW steps whose
ZeRO-2/3 / FSDP2 checkpoint is resumed by 1 rank and exported. Peak RSS per rank (kernel VmHWM) of
DDP, ZeRO-3 (bundled zero3.json) and FSDP2 runs in launches of its own.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from multiproc import run_commands
from train_fixtures import ACCELERATE_CONFIGS, FAST, REPO, free_port, saved_engine

from trainer.config import load_train_config
from trainer.engines import create_engine
from trainer.loop import build_loader, train
from trainer.tasks import make_task

pytestmark = pytest.mark.slow
TIMEOUT_S = 240
STEPS = 3
WORKER = str(Path(__file__).resolve().parent / "strategy_worker.py")

STRATEGIES = {
    "ddp": ["engine.strategy=ddp"],
    "zero1": ["engine.strategy=deepspeed", "engine.zero_stage=1"],
    "zero2": ["engine.strategy=deepspeed", "engine.zero_stage=2"],
    # the bundled zero3.json keeps parameters under 1e5 values whole on every rank (a GPU speed
    # setting); at debug sizes that is most of them, so the test partitions every parameter
    "zero3": ["engine.strategy=deepspeed", "engine.zero_stage=3", "engine.deepspeed_config={zero3_all}"],
    "fsdp2": ["engine.strategy=fsdp2"],
    # regional torch.compile (trainer.compile_model) before the wrapping, against the eager one-process run;
    # aot_eager captures the same graphs (dynamo + AOTAutograd around DDP / FSDP2 hooks) without inductor's
    # C++ builds (minutes per process on CPU); inductor numerics are checked in one process (test_compile.py)
    "ddp_compiled": ["engine.strategy=ddp", "engine.compile=true", "engine.compile_backend=aot_eager"],
    "fsdp2_compiled": ["engine.strategy=fsdp2", "engine.compile=true", "engine.compile_backend=aot_eager"],
}
GLOBAL_BATCH = 4
MEMORY_DIT = "{width: 768, depth: 4, heads: 12}"   # tens of millions of parameters: AdamW state + EMA dominate
# Peak RSS per rank / DDP's, measured 2026-12-02 (2 ranks, 44.5 M parameters, fixed mmap threshold): FSDP2
# 0.589, ZeRO-3 with the bundled zero3.json 1.081 -- MORE than DDP on CPU at this size: DeepSpeed keeps an
# fp32 master partition beside the (here also fp32) partitioned parameters and gathers the whole model for
# the step (max live parameters 1e9). The bars guard these measurements against regressions; they do not
# claim that ZeRO-3 saves memory here (docs/benchmarks.md, Strategy tests).
MEMORY_RATIO_MAX = {"fsdp2": 0.65, "zero3": 1.15}
# glibc's malloc raises its mmap threshold after each large free (up to 32 MiB), after which freed tensors
# stay in the heap and count in RSS: peaks then varied by 10 % between runs and ranks (ZeRO-3 1.27-1.41 of
# DDP, one CI failure). A fixed threshold gives every tensor over 128 KiB its own mapping, returned on
# free, so RSS follows live tensors: the same peaks to 0.1 MiB on every rank and run.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
ACCUMULATION = (1, 2)
# SGD's update is -lr x grad; a large lr keeps the rounding of w - lr g (~1e-7 |w|) far below 1e-4 |lr g|
SGD_LR = 1e3
GRAD_REL = 1e-4
COMMON = ["optim.warmup_steps=1", "optim.lr=1e-3", "ema.decay=0.5", "run.progress=false"]


def task_overrides(shards: Path, run_dir: Path, vae_ckpt: Path) -> dict[str, list[str]]:
    return {
        "vae": ["task=vae", "model.name=vecset_vae/debug", f"data.path={shards}", f"run.dir={run_dir}/vae",
                "data.options={num_surface: 256, num_vol: 256, num_near: 256}", "model.activation_checkpointing=1",
                *COMMON],
        "dit": ["task=dit", "model.name=vecset_dit/debug", f"data.path={shards}", f"run.dir={run_dir}/dit",
                f"vae.checkpoint={vae_ckpt}", "vae.scale_factor=1.5", "vae.latents=sample",
                "data.options={num_surface: 256}", "condition.p_uncond=0.5", *COMMON],
    }


def deepspeed_json(path: Path, stage: int, partition_all: bool = False, any_optimizer: bool = False) -> Path:
    """The bundled configs/deepspeed/zero<stage>.json, with every parameter partitioned (ZeRO-3) and/or
    the optimiser check off (ZeRO refuses optimisers it has not been tested with, such as plain SGD)."""
    cfg = json.loads((REPO / f"configs/deepspeed/zero{stage}.json").read_text())
    if partition_all:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if any_optimizer:
        cfg["zero_allow_untested_optimizer"] = True
    path.write_text(json.dumps(cfg))
    return path


def global_batches(overrides: list[str], path: Path) -> Path:
    """STEPS batches of 4 samples (the global batch) from one process's loader."""
    cfg = load_train_config(None, [*overrides, "data.batch_size=4"])
    engine = create_engine(cfg.engine, cfg.precision)
    task = make_task(cfg, engine.device)
    loader = iter(build_loader(cfg, task, engine))
    torch.save([next(loader) for _ in range(STEPS)], path)
    return path


def launch(world: int, spec: dict, spec_file: Path, timeout_s: int = TIMEOUT_S, env: dict | None = None) -> dict:
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if world == 1:
        cmd = [sys.executable, WORKER, str(spec_file)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(world),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), WORKER, str(spec_file)]
    run_commands([cmd], envs=[env], log_dir=spec_file.parent / "logs", timeout_s=timeout_s)   # exit code 0
    return json.loads((Path(spec["out"]) / "results.json").read_text())


class Runs:
    """Runs shared by the tests of this module: each strategy trains once."""

    def __init__(self, root: Path, shards: Path):
        self.root, self.results = root, {}
        vae_dir = root / "frozen_vae"
        train(load_train_config("vecset_vae_debug", [f"data.path={shards}", f"run.dir={vae_dir}", *FAST,
                                                     "run.max_steps=1", "run.eval_every=0"]))
        self.overrides = task_overrides(shards, root, vae_dir / "checkpoints" / "step_00000001")
        self.batches = {name: global_batches(o, root / f"{name}_batches.pt") for name, o in self.overrides.items()}
        self.zero3_all = deepspeed_json(root / "zero3_partition_all.json", 3, partition_all=True)

    def jobs(self, strategy: str, batch_size: int, accum: int = 1, tasks=("vae", "dit"), **extra) -> list[dict]:
        return [{"name": name, "batches": str(self.batches[name]),
                 "overrides": [*self.overrides[name],
                               *(x.format(zero3_all=self.zero3_all) for x in STRATEGIES[strategy]),
                               f"data.batch_size={batch_size}", f"optim.grad_accum={accum}"], **extra}
                for name in tasks]

    def gradient_jobs(self, strategy: str) -> list[dict]:
        """One SGD step per task and accumulation, each rank's batches from its own loader."""
        extra = [x.format(zero3_all=self.sgd_json(3)) for x in STRATEGIES[strategy]]
        if strategy in ("zero1", "zero2"):
            extra.append(f"engine.deepspeed_config={self.sgd_json(int(strategy[-1]))}")
        return [{"name": f"{task}_accum{accum}", "mode": "gradient", "lr": SGD_LR,
                 "overrides": [*self.overrides[task], *extra, f"data.batch_size={GLOBAL_BATCH // 2 // accum}",
                               f"optim.grad_accum={accum}", "optim.clip_grad_norm=0"]}
                for task in ("vae", "dit") for accum in ACCUMULATION]

    def memory(self, strategy: str) -> dict:
        """DDP, ZeRO-3 with the bundled zero3.json or FSDP2 on 2 ranks, in a launch of its own (nothing
        else allocated): a DiT wide enough that its parameters and AdamW state dominate a rank's memory."""
        key = f"{strategy}_memory"
        if key not in self.results:
            out = self.root / key
            out.mkdir()
            self.results[key] = launch(2, {"mode": "memory", "out": str(out), "jobs": self.memory_jobs(strategy)},
                                       out / "spec.json", env=MEMORY_ENV)["memory"]
        return self.results[key]

    def memory_jobs(self, strategy: str) -> list[dict]:
        engine = [x for x in STRATEGIES[strategy] if not x.startswith("engine.deepspeed_config")]
        if strategy == "zero3":
            engine.append(f"engine.deepspeed_config={REPO / 'configs/deepspeed/zero3.json'}")
        return [{"name": "memory", "mode": "memory", "batches": str(self.batches["dit"]),
                 "overrides": [*self.overrides["dit"], *engine, f"data.batch_size={GLOBAL_BATCH // 2}",
                               f"model.overrides={MEMORY_DIT}"]}]

    def sgd_json(self, stage: int) -> Path:
        return deepspeed_json(self.root / f"zero{stage}_sgd.json", stage, partition_all=stage == 3, any_optimizer=True)

    def get(self, strategy: str) -> tuple[dict, Path]:
        """Results of ``strategy`` on 2 ranks: the AdamW runs (checkpoints) and the SGD gradient jobs,
        in one launch (each launch pays for the imports)."""
        out = self.root / strategy
        if strategy not in self.results:
            out.mkdir()
            compiled = strategy.endswith("_compiled")   # gradients only (the AdamW runs feed the checkpoint tests)
            jobs = ([] if compiled else self.jobs(strategy, GLOBAL_BATCH // 2)) + self.gradient_jobs(strategy)
            # compiled runs trace every block first (dynamo + AOTAutograd: tens of seconds)
            self.results[strategy] = launch(2, {"mode": "train", "out": str(out), "jobs": jobs}, out / "spec.json",
                                            2 * TIMEOUT_S if compiled else TIMEOUT_S)
        return self.results[strategy], out


@pytest.fixture(scope="module")
def runs(train_shards, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("strategies"), train_shards)


def assert_weights_close(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys() and got
    for name, w in want.items():
        torch.testing.assert_close(got[name].float(), w.float(), msg=name, **tol)


def assert_gradients_match(got: dict, want: dict, rel: float, what: str) -> float:
    """Every parameter's gradient within ``rel`` of the reference (relative L2 norm of the difference),
    tensors whose reference gradient is ~0 measured against the whole model's gradient norm."""
    assert got.keys() == want.keys() and want, what
    total = sum(float(w.double().pow(2).sum()) for w in want.values()) ** 0.5
    worst = 0.0
    for name, w in want.items():
        err = float((got[name].double() - w.double()).norm()) / max(float(w.double().norm()), 1e-3 * total)
        worst = max(worst, err)
        assert err <= rel, f"{what}: {name}: |got - want| / |want| = {err:.3g} > {rel} " \
                           f"(|got| = {float(got[name].norm()):.4g}, |want| = {float(w.norm()):.4g})"
    return worst


@pytest.mark.parametrize("strategy", [pytest.param(s, marks=pytest.mark.timeout(1200)) if s.endswith("_compiled") else s
                                      for s in sorted(STRATEGIES)])
def test_gradients_match_one_process_after_one_micro_batch_and_after_accumulation(runs, strategy):
    """The update plain SGD applies under ``strategy`` on 2 ranks (each rank's batches from its own
    make_loader on the shards) is lr x the gradient one process computes on the same global batch:
    catches a wrong world-size factor, a sum instead of a mean, an accumulation not divided or not
    reduced, a partition written to the wrong place. The EMA follows the trained weights."""
    results, out = runs.get(strategy)
    ddp, _ = runs.get("ddp")
    for job in (f"{task}_accum{accum}" for task in ("vae", "dit") for accum in ACCUMULATION):
        result = results[job]
        rank0, rank1 = ({i for batch in rank for i in batch} for rank in result["ids"])
        assert rank0 and not rank0 & rank1, f"{job}: the ranks read the same samples"
        assert result["ids"] == ddp[job]["ids"], f"{job}: the loader handed out other samples than under DDP"
        saved = torch.load(out / f"{job}_gradients.pt", weights_only=True)
        worst = assert_gradients_match(saved["got"], saved["want"], GRAD_REL, f"{strategy} {job}")
        print(f"{strategy} {job}: worst per-tensor relative gradient error {worst:.2e}")
        decay = saved["decay"]
        for name in saved["want"]:
            blend = decay * saved["before"][name] + (1 - decay) * saved["after"][name]
            torch.testing.assert_close(saved["ema"][name], blend, rtol=1e-5, atol=1e-6, msg=f"{job} EMA {name}")


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_launch_config_is_saved_as_run_and_reruns_under_torchrun(accelerate_finetunes, name):  # noqa: F811
    """`accelerate launch --config_file configs/accelerate/<name>.yaml` runs `shapeflow train` with that
    strategy on 2 CPU processes (our engine wraps the model; accelerate only starts the processes), saves
    the strategy it ran everywhere, and the saved config.yaml resumes under torchrun with that strategy.
    (The runs fine-tune an imported release: train_fixtures.AccelerateFinetunes, shared with test_finetune.)"""
    strategy = ACCELERATE_CONFIGS[name][0]
    stage = 2 if strategy == "deepspeed" else None
    runs = accelerate_finetunes.get(name)
    run_dir, output, saved = runs["run_dir"], runs["torchrun_output"], runs["after_accelerate"]
    assert saved["meta"] == (strategy, 2)
    assert saved["config.yaml"] == saved["checkpoint"] == (strategy, stage)
    assert saved["mlflow"] == (strategy, str(stage))
    assert saved["tags"]["shapeflow.resolved_from.engine.strategy"].startswith("accelerate config (ACCELERATE_USE_")
    assert saved["resolved_from"]["world_size"] == "accelerate (WORLD_SIZE=2)"
    assert "resolved from" in saved["config.yaml text"]
    assert "done at step 3" in output
    resumed = saved_engine(run_dir, 3)
    assert resumed["meta"] == (strategy, 2) and resumed["checkpoint"] == (strategy, stage)
    assert resumed["resolved_from"]["engine.strategy"] == "config"
    assert resumed["tags"]["shapeflow.launcher"] == "torchrun"


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_peak_memory_per_rank_against_ddp(runs, strategy):
    """Peak resident memory per rank during an AdamW step, measured by the kernel (VmHWM), for a DiT
    whose parameters, gradients, AdamW state and EMA dominate; ZeRO-3 runs the bundled zero3.json."""
    ddp, sharded = runs.memory("ddp"), runs.memory(strategy)
    assert ddp["params"] == sharded["params"] > 20e6
    ratios = [s / d for s, d in zip(sharded["peak_mib"], ddp["peak_mib"])]
    print(f"{strategy}: peak MiB per rank {sharded['peak_mib']} vs DDP {ddp['peak_mib']} (ratios {ratios}); "
          f"engine's own count {sharded['engine_report']} vs DDP {ddp['engine_report']}")
    assert all(r < MEMORY_RATIO_MAX[strategy] for r in ratios), (ratios, sharded, ddp)


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp2"])
def test_two_rank_checkpoint_resumes_on_one_rank_and_exports(runs, strategy, tmp_path):
    """Weights and EMA bit-exact, Adam state restored (DCP resharding; DeepSpeed's universal checkpoint)."""
    from safetensors.torch import load_file

    from trainer import commands as cli

    _, two_dir = runs.get(strategy)
    out = tmp_path / "resumed"
    out.mkdir()
    jobs = runs.jobs(strategy, 4, checkpoint=None)
    for job in jobs:
        job["checkpoint"] = str(two_dir / f"{job['name']}_ckpt" / f"step_{STEPS:08d}")
    resumed = launch(1, {"mode": "resume", "out": str(out), "jobs": jobs}, out / "spec.json")
    for job in jobs:
        name = job["name"]
        saved = torch.load(two_dir / f"{name}_weights.pt", weights_only=True)
        loaded = torch.load(out / f"{name}_resumed_weights.pt", weights_only=True)
        assert_weights_close(loaded["model"], saved["model"], rtol=0, atol=0)
        assert_weights_close(loaded["ema"], saved["ema"], rtol=0, atol=0)
        assert resumed[name]["adam_steps"] == [float(STEPS)]   # the moments came back, not a fresh optimiser
        assert len(resumed[name]["losses"]) == 1   # and it trains on
        for use_ema in (False, True):
            target = tmp_path / f"{name}_{'ema' if use_ema else 'model'}.safetensors"
            argv = ["export", job["checkpoint"], "--out", str(target)] + (["--ema"] if use_ema else [])
            assert cli.main(argv) == 0
            exported = load_file(str(target))
            want = saved["ema" if use_ema else "model"]
            assert_weights_close(exported, {k[len("net."):]: v for k, v in want.items()}, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["zero2", "fsdp2"])
def test_a_non_finite_loss_skips_the_update_under_sharded_strategies(train_shards, tmp_path, monkeypatch, strategy):
    """One process (a one-rank group): the NaN step is skipped and counted, the weights do not move."""
    import math

    from test_train_paths import poison_loss

    from trainer import checkpoint as ckpt

    monkeypatch.setenv("LOCAL_RANK", "0")   # DeepSpeed sets it for a launcher-less process; keep it local
    poison_loss(monkeypatch, {1})
    run_dir = tmp_path / "run"
    summary = train(load_train_config("vecset_vae_debug", [
        f"data.path={train_shards}", f"run.dir={run_dir}", *FAST, "run.eval_every=0", "run.max_steps=3",
        "run.ckpt_every=1", "ema.enabled=false", *STRATEGIES[strategy]]))
    assert summary["skipped_steps"] == 1 and math.isnan(summary["losses"][1])
    weights = [ckpt.network_state(run_dir / "checkpoints" / f"step_{s:08d}", use_ema=False) for s in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])     # the poisoned step changed nothing
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # training went on
