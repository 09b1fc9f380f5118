"""One process vs two DDP processes (gloo, CPU): same first-step loss and gradients on the same global
batch, for the VAE and the DiT; and `shapeflow train` under torchrun."""
from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from multiproc import run_commands, spawn_ranks
from train_fixtures import FAST, REPO, free_port

from trainer import checkpoint as ckpt
from trainer.config import load_train_config
from trainer.engines import create_engine
from trainer.loop import build_loader, train
from trainer.tasks import BatchRandom, make_task, to_device

pytestmark = pytest.mark.slow
TIMEOUT_S = 180


def rows(batch: dict, lo: int, hi: int) -> dict:
    """Samples lo..hi of a collated batch (per-batch scalars such as num_tokens are kept)."""
    size = len(batch["id"])
    return {k: (v[lo:hi] if isinstance(v, (list, torch.Tensor)) and len(v) == size and getattr(v, "ndim", 1) > 0
                else v) for k, v in batch.items()}


def first_step(rank: int, world: int, port: int, overrides: list[str], batch_file: str, out_file: str) -> None:
    """Loss and gradients of step 0 on this rank's rows of the saved global batch (DDP-averaged)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if world == 1:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key)
    torch.set_num_threads(1)
    cfg = load_train_config(None, overrides)
    engine = create_engine(cfg.engine, cfg.precision)
    try:
        torch.manual_seed(0)  # identical initial weights everywhere (DDP would broadcast rank 0's anyway)
        task = make_task(cfg, engine.device)
        task.prepare(partial(build_loader, cfg, task, engine), engine)
        model = engine.prepare(task.objective, lambda p: torch.optim.SGD(p, lr=0.0),
                               lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0))
        global_batch = torch.load(batch_file, weights_only=False)
        local = len(global_batch["id"]) // world
        batch = to_device(rows(global_batch, rank * local, (rank + 1) * local), engine.device)
        rand = BatchRandom(cfg.run.seed, 0, 0, engine.rank, engine.world_size, local, engine.device)
        with engine.accumulate(sync=True):
            loss, _ = task.compute(model, batch, rand, 0)
            engine.backward(loss)
        mean_loss = engine.all_reduce_mean({"loss": float(loss.detach())})["loss"]
        # FSDP2 holds sharded DTensor gradients: gather them (a collective, every rank calls it)
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for n, p in engine.module.named_parameters() if p.grad is not None}
        if engine.is_main:
            torch.save({"loss": mean_loss, "grads": grads}, out_file)
    finally:
        engine.close()


def run_world(world: int, overrides: list[str], batch_file: Path, out_file: Path) -> dict:
    args = (world, free_port(), overrides, str(batch_file), str(out_file))
    if world == 1:
        first_step(0, *args)
    else:
        spawn_ranks(first_step, args, nprocs=world, log_dir=out_file.parent / f"{out_file.stem}_logs",
                    timeout_s=TIMEOUT_S)
    return torch.load(out_file, weights_only=False)


def compare(tmp_path: Path, overrides: list[str]) -> None:
    cfg = load_train_config(None, overrides)
    engine = create_engine(cfg.engine, cfg.precision)
    task = make_task(cfg, engine.device)
    batch = next(iter(build_loader(cfg, task, engine)))  # batch_size 4 = the global batch
    torch.save(batch, tmp_path / "batch.pt")
    one = run_world(1, overrides + ["data.batch_size=4"], tmp_path / "batch.pt", tmp_path / "one.pt")
    two = run_world(2, overrides + ["data.batch_size=2"], tmp_path / "batch.pt", tmp_path / "two.pt")
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert one["grads"].keys() == two["grads"].keys() and one["grads"]
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_vae_one_vs_two_processes_same_loss_and_gradients(train_shards, tmp_path):
    compare(tmp_path, ["task=vae", "model.name=vecset_vae/debug", f"data.path={train_shards}",
                       f"run.dir={tmp_path}/run", "data.batch_size=4",
                       "data.options={num_surface: 256, num_vol: 256, num_near: 256}"])


def test_dit_one_vs_two_processes_same_loss_and_gradients(train_shards, tmp_path):
    vae_dir = tmp_path / "vae"
    train(load_train_config("vecset_vae_debug", [f"data.path={train_shards}", f"run.dir={vae_dir}", *FAST,
                                                 "run.max_steps=1", "run.eval_every=0"]))
    compare(tmp_path, ["task=dit", "model.name=vecset_dit/debug", f"data.path={train_shards}",
                       f"run.dir={tmp_path}/run", f"vae.checkpoint={vae_dir}/checkpoints/step_00000001",
                       "vae.scale_factor=1.5", "vae.latents=sample", "data.options={num_surface: 256}",
                       "condition.p_uncond=0.5"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_image_dit_one_vs_two_processes_same_loss_and_gradients(train_shards, tmp_path, strategy):
    """condition.kind=image: the frozen tiny DINOv2 runs on every rank outside the engine."""
    from trainer.image_encoder import save_tiny_dinov2
    vae_dir = tmp_path / "vae"
    train(load_train_config("vecset_vae_debug", [f"data.path={train_shards}", f"run.dir={vae_dir}", *FAST,
                                                 "run.max_steps=1", "run.eval_every=0"]))
    encoder = save_tiny_dinov2(tmp_path / "dino", image_size=56, hidden_size=32)
    compare(tmp_path, ["task=dit", "model.name=vecset_dit/debug", f"data.path={train_shards}",
                       f"run.dir={tmp_path}/run", f"vae.checkpoint={vae_dir}/checkpoints/step_00000001",
                       "vae.scale_factor=1.5", "data.options={num_surface: 256}", f"engine.strategy={strategy}",
                       "condition.kind=image", f"condition.image_encoder={encoder}", "condition.image_size=56",
                       "condition.p_uncond=0.5"])


LAUNCHERS = {
    "torchrun": lambda: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # --multi_gpu starts torchrun-style processes, also without a GPU (--cpu would start just one)
    "accelerate": lambda: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port())],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_shapeflow_train_as_two_ddp_processes(train_shards, tmp_path, launcher):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [*LAUNCHERS[launcher](), "-m", "trainer.commands", "train", "vecset_vae_debug", f"data.path={train_shards}",
           f"run.dir={run_dir}", *FAST, "run.max_steps=3", "run.ckpt_every=3", "run.eval_every=0",
           "run.log_every=1"]
    run_commands([cmd], envs=[env], log_dir=tmp_path / "logs", timeout_s=TIMEOUT_S)   # exit code 0
    meta = ckpt.read_meta(run_dir / "checkpoints" / "step_00000003")
    assert meta["world_size"] == 2
    assert (run_dir / "checkpoints" / "step_00000003" / "rank_00001.pt").exists()
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.run_id == meta["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2, 3]
    gathered = ckpt.gathered_loader_states(run_dir / "checkpoints" / "step_00000003", 2)
    assert [s["rank"] for s in gathered["ranks"]] == [0, 1] and gathered["ranks"][0]["world_size"] == 2
    if launcher == "torchrun":   # one process resumes and its loader takes the 2-rank cursor (test_loader.py)
        train(load_train_config("vecset_vae_debug", [f"data.path={train_shards}", f"run.dir={run_dir}", *FAST,
                                                     "run.max_steps=4", "run.ckpt_every=4", "run.eval_every=0"]))
        assert ckpt.read_meta(run_dir / "checkpoints" / "step_00000004")["world_size"] == 1
