"""DDP, ZeRO-1/2/3 and FSDP2 on 2 CPU processes (gloo) against one process on the same global batches.

One torchrun per strategy trains the VAE and then the DiT debug presets for a few steps through the
loop's optimiser step (tests/strategy_worker.py); the test compares per-step losses and the final
gathered weights with a single DDP process, per-rank parameter + optimiser bytes with DDP's, and a
ZeRO-3 / FSDP2 checkpoint written by 2 ranks resumed by 1 rank and exported to safetensors.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import load_train_config
from trainer.engines import create_engine
from trainer.loop import build_loader, train
from trainer.tasks import make_task

from multiproc import run_commands
from train_fixtures import FAST, REPO, free_port, train_shards  # noqa: F401  (fixture)

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


def global_batches(overrides: list[str], path: Path) -> Path:
    """STEPS batches of 4 samples (the global batch) from one process's loader."""
    cfg = load_train_config(None, [*overrides, "data.batch_size=4"])
    engine = create_engine(cfg.engine, cfg.precision)
    task = make_task(cfg, engine.device)
    loader = iter(build_loader(cfg, task, engine))
    torch.save([next(loader) for _ in range(STEPS)], path)
    return path


def launch(world: int, spec: dict, spec_file: Path, timeout_s: int = TIMEOUT_S) -> dict:
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
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
        zero3 = json.loads((REPO / "configs/deepspeed/zero3.json").read_text())
        zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        self.zero3_all = root / "zero3_partition_all.json"
        self.zero3_all.write_text(json.dumps(zero3))

    def jobs(self, strategy: str, batch_size: int, accum: int = 1, tasks=("vae", "dit"), **extra) -> list[dict]:
        return [{"name": name, "batches": str(self.batches[name]),
                 "overrides": [*self.overrides[name],
                               *(x.format(zero3_all=self.zero3_all) for x in STRATEGIES[strategy]),
                               f"data.batch_size={batch_size}", f"optim.grad_accum={accum}"], **extra}
                for name in tasks]

    def get(self, strategy: str, world: int = 2, accum: int = 1) -> tuple[dict, Path]:
        """Results of ``strategy`` on ``world`` ranks (global batch 4 = world x batch x accum)."""
        key = f"{strategy}_w{world}" + (f"_accum{accum}" if accum > 1 else "")
        out = self.root / key
        if key not in self.results:
            out.mkdir(exist_ok=True)
            tasks = ("vae", "dit") if accum == 1 else ("vae",)
            spec = {"mode": "train", "out": str(out), "jobs": self.jobs(strategy, 4 // world // accum, accum, tasks)}
            # compiled runs trace every block first (dynamo + AOTAutograd: tens of seconds)
            timeout = 2 * TIMEOUT_S if strategy.endswith("_compiled") else TIMEOUT_S
            self.results[key] = launch(world, spec, out / "spec.json", timeout)
        return self.results[key], out


@pytest.fixture(scope="module")
def runs(train_shards, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("strategies"), train_shards)


def assert_weights_close(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys() and got
    for name, w in want.items():
        torch.testing.assert_close(got[name].float(), w.float(), msg=name, **tol)


def assert_models_close(got: dict, want: dict, rel: float) -> None:
    """Whole-model relative distance: Adam turns noise-level gradient differences of parameters whose
    gradient is ~0 (e.g. qk-norm biases) into lr-sized steps, so per-element tolerances do not apply."""
    assert got.keys() == want.keys() and got
    diff = sum(float((got[k].float() - w.float()).pow(2).sum()) for k, w in want.items()) ** 0.5
    norm = sum(float(w.float().pow(2).sum()) for w in want.values()) ** 0.5
    assert diff <= rel * norm, f"|got - want| = {diff:.3g} > {rel} * |want| = {rel * norm:.3g}"


@pytest.mark.parametrize("strategy", [pytest.param(s, marks=pytest.mark.timeout(1200)) if s.endswith("_compiled") else s
                                      for s in sorted(STRATEGIES)])
def test_two_processes_match_one_process(runs, strategy):
    one, one_dir = runs.get("ddp", world=1)
    two, two_dir = runs.get(strategy, world=2)
    for task in ("vae", "dit"):
        assert len(two[task]["losses"]) == STEPS
        assert two[task]["losses"] == pytest.approx(one[task]["losses"], rel=2e-4), task
        want = torch.load(one_dir / f"{task}_weights.pt", weights_only=True)
        got = torch.load(two_dir / f"{task}_weights.pt", weights_only=True)
        assert_models_close(got["model"], want["model"], rel=1e-3)
        assert_models_close(got["ema"], want["ema"], rel=1e-3)


@pytest.mark.parametrize("strategy", ["zero2", "fsdp2"])
def test_gradient_accumulation_matches_one_process(runs, strategy):
    """2 micro-steps per optimiser step (DeepSpeed's accumulation boundary, FSDP2's deferred gradient sync)."""
    one, one_dir = runs.get("ddp", world=1, accum=2)
    two, two_dir = runs.get(strategy, world=2, accum=2)
    assert two["vae"]["losses"] == pytest.approx(one["vae"]["losses"], rel=2e-4)
    want = torch.load(one_dir / "vae_weights.pt", weights_only=True)
    got = torch.load(two_dir / "vae_weights.pt", weights_only=True)
    assert_models_close(got["model"], want["model"], rel=1e-3)


LAUNCH_CONFIGS = {"zero2": ("deepspeed", "configs/accelerate/zero2.yaml"),
                  "fsdp2": ("fsdp2", "configs/accelerate/fsdp2.yaml")}


def launch_train(launcher: list[str], config: str, overrides: list[str], log_dir: Path) -> str:
    """Run one launcher command to exit code 0 (bounded); returns its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", *launcher, "-m", "trainer.commands", "train", config, *overrides]
    ranks = run_commands([cmd], envs=[env], cwd=REPO, log_dir=log_dir, timeout_s=TIMEOUT_S)   # exit code 0
    return ranks.output(0, 100_000)


def saved_engine(run_dir: Path, step: int) -> dict:
    """engine.strategy / zero_stage as run.dir/config.yaml, the checkpoint and the MLflow params say."""
    import yaml
    from mlflow.tracking import MlflowClient

    checkpoint = run_dir / "checkpoints" / f"step_{step:08d}"
    meta = json.loads((checkpoint / "meta.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(meta["mlflow_run_id"])
    keys = ("strategy", "zero_stage")
    return {"config.yaml": tuple(yaml.safe_load((run_dir / "config.yaml").read_text())["engine"][k] for k in keys),
            "checkpoint": tuple(yaml.safe_load((checkpoint / "config.yaml").read_text())["engine"][k] for k in keys),
            "mlflow": tuple(run.data.params[f"engine.{k}"] for k in keys),
            "meta": (meta["strategy"], meta["world_size"]), "tags": run.data.tags,
            "resolved_from": meta["resolved_from"]}


@pytest.mark.parametrize("name", sorted(LAUNCH_CONFIGS))
def test_accelerate_launch_config_is_saved_as_run_and_reruns_under_torchrun(train_shards, tmp_path, name):
    """`accelerate launch --config_file configs/accelerate/<name>.yaml` runs `shapeflow train` with that
    strategy on 2 CPU processes (our engine wraps the model; accelerate only starts the processes), saves
    the strategy it ran everywhere, and the saved config.yaml resumes under torchrun with that strategy."""
    strategy, config = LAUNCH_CONFIGS[name]
    stage = 2 if strategy == "deepspeed" else None
    run_dir = tmp_path / "run"
    launch_train(["accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
                  "--main_process_port", str(free_port())], "vecset_vae_debug",
                 [f"data.path={train_shards}", f"run.dir={run_dir}", *FAST, "run.max_steps=2", "run.ckpt_every=2",
                  "run.eval_every=0"], tmp_path / "accelerate_logs")
    saved = saved_engine(run_dir, 2)
    assert saved["meta"] == (strategy, 2)
    assert saved["config.yaml"] == saved["checkpoint"] == (strategy, stage)
    assert saved["mlflow"] == (strategy, str(stage))
    assert saved["tags"]["shapeflow.resolved_from.engine.strategy"].startswith("accelerate config (ACCELERATE_USE_")
    assert saved["resolved_from"]["world_size"] == "accelerate (WORLD_SIZE=2)"
    assert "resolved from" in (run_dir / "config.yaml").read_text()
    output = launch_train(["torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port())], str(run_dir / "config.yaml"),
                          ["run.max_steps=3"], tmp_path / "torchrun_logs")
    assert "done at step 3" in output
    resumed = saved_engine(run_dir, 3)
    assert resumed["meta"] == (strategy, 2) and resumed["checkpoint"] == (strategy, stage)
    assert resumed["resolved_from"]["engine.strategy"] == "config"
    assert resumed["tags"]["shapeflow.launcher"] == "torchrun"


def param_and_optimizer_bytes(result: dict) -> list[int]:
    return [m["param_bytes"] + m["optimizer_bytes"] for m in result["memory"]]


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_sharded_strategies_hold_about_half_of_ddp_per_rank(runs, strategy):
    ddp, _ = runs.get("ddp")
    sharded, _ = runs.get(strategy)
    for task in ("vae", "dit"):
        base = param_and_optimizer_bytes(ddp[task])
        ours = param_and_optimizer_bytes(sharded[task])
        ratios = [o / b for o, b in zip(ours, base)]
        print(f"{strategy} {task}: per-rank param+optimizer bytes {ours} vs DDP {base} (ratios {ratios})")
        assert all(0.4 < r < 0.6 for r in ratios), (task, ours, base)


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

    from trainer import checkpoint as ckpt
    from test_train_paths import poison_loss

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
