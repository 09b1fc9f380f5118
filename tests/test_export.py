"""`shapeflow export` on a DDP (single-process) run, and `shapeflow sample` from the exported files.

Sharded checkpoints (ZeRO-3, FSDP2 from 2 ranks) are exported in tests/test_strategies.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from safetensors.torch import load_file
from train_fixtures import FAST

from trainer import checkpoint as ckpt
from trainer import commands as cli
from trainer import inference
from trainer.config import load_train_config
from trainer.loop import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(train_shards, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    common = [f"data.path={train_shards}", *FAST, "run.max_steps=2", "run.eval_every=0", "ema.decay=0.5"]
    train(load_train_config("vecset_vae_debug", [*common, f"run.dir={root}/vae"]))
    vae = root / "vae" / "checkpoints" / "step_00000002"
    train(load_train_config("vecset_dit_debug", [*common, f"run.dir={root}/dit", f"vae.checkpoint={vae}",
                                                 "data.options={}"]))
    return {"vae": vae, "dit": root / "dit" / "checkpoints" / "step_00000002", "root": root}


@pytest.mark.parametrize("use_ema", [False, True])
def test_export_writes_the_network_weights_and_config(runs, tmp_path, use_ema):
    out = tmp_path / "vae.safetensors"
    assert cli.main(["export", str(runs["vae"]), "--out", str(out)] + (["--ema"] if use_ema else [])) == 0
    want = ckpt.network_state(runs["vae"], use_ema)
    got = load_file(str(out))
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    raw, ema = ckpt.network_state(runs["vae"], False), ckpt.network_state(runs["vae"], True)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)   # the two exports differ
    net, cfg, meta = inference.load_network(out)
    assert cfg.task == "vae" and meta["step"] == 2
    assert all(torch.equal(p, got[n]) for n, p in net.state_dict().items())


def test_sample_loads_exported_files_like_checkpoint_directories(runs, tmp_path):
    dit_file, vae_file = tmp_path / "dit.safetensors", tmp_path / "vae.safetensors"
    assert cli.main(["export", str(runs["dit"]), "--out", str(dit_file), "--ema"]) == 0
    assert cli.main(["export", str(runs["vae"]), "--out", str(vae_file), "--ema"]) == 0
    args = ["--num", "1", "--steps", "2", "--resolution", "16", "--format", "obj"]
    assert cli.main(["sample", str(runs["dit"]), "--out", str(tmp_path / "a"), *args]) == 0
    assert cli.main(["sample", str(dit_file), "--vae", str(vae_file), "--out", str(tmp_path / "b"), *args]) == 0
    a = json.loads((tmp_path / "a" / "samples.json").read_text())
    b = json.loads((tmp_path / "b" / "samples.json").read_text())
    assert a["empty"] == b["empty"] and len(a["files"]) == len(b["files"])
    for fa, fb in zip(sorted(a["files"]), sorted(b["files"])):
        np.testing.assert_array_equal(trimesh.load(fa).vertices, trimesh.load(fb).vertices)


def test_export_errors_name_the_problem(runs, tmp_path, capsys):
    assert cli.main(["export", str(runs["vae"]), "--out", str(tmp_path / "x.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    no_ema = tmp_path / "no_ema"
    cfg = load_train_config(runs["vae"] / "config.yaml", [f"run.dir={no_ema}", "ema.enabled=false",
                                                          "run.max_steps=1", "run.resume=never"])
    train(cfg)
    assert cli.main(["export", str(no_ema / "checkpoints" / "step_00000001"), "--out",
                     str(tmp_path / "x.safetensors"), "--ema"]) == 2
    assert "holds no EMA weights" in capsys.readouterr().err
