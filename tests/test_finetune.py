"""Fine-tuning an imported release: `shapeflow import` -> `shapeflow train model.init_from=FILE` under
FSDP2 and ZeRO-2 (2 gloo processes, started by `accelerate launch` with the bundled accelerate configs)
-> resume under torchrun -> `shapeflow export --format` back to the anchor layout. The runs are
train_fixtures.AccelerateFinetunes, shared with test_strategies' accelerate-config test."""
from __future__ import annotations

import pytest
import torch
from train_fixtures import ACCELERATE_CONFIGS

import models
from trainer import checkpoint as ckpt
from trainer import commands as cli
from trainer import interop, load_network

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("strategy", sorted(ACCELERATE_CONFIGS))
def test_imported_vae_finetunes_resumes_and_exports(accelerate_finetunes, tmp_path, strategy):  # noqa: F811
    runs = accelerate_finetunes.get(strategy)
    imported, run = runs["imported"], runs["run_dir"]
    assert ckpt.read_meta(run / "checkpoints" / "step_00000002")["strategy"] == ACCELERATE_CONFIGS[strategy][0]
    assert ckpt.read_meta(run / "checkpoints" / "step_00000003")["step"] == 3
    start, tuned = load_network(imported), load_network(run)
    assert type(tuned) is type(start) and tuned.config == start.config   # the imported architecture
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert changed   # it trained from the imported weights ...
    out = tmp_path / "back"
    assert cli.main(["export", str(run), "--format", "hunyuan3d-2.1-vae", "--out", str(out)]) == 0
    cfg, state, _, _ = interop.read_source("hunyuan3d-2.1-vae", out)   # ... and goes back to the release layout
    back = models.build_from_config(cfg)
    back.load_state_dict(state)   # the sharp flag's row 0 was folded into the input bias: same function
    pts, nrm, lat = torch.rand(1, 40, 3) - 0.5, torch.randn(1, 40, 3), torch.randn(1, 16, 4)
    with torch.no_grad():
        for net_a, net_b in [(tuned, back.eval())]:
            a = net_a.encode(pts, nrm, pts[:, :10], nrm[:, :10], num_latents=12, num_sharp_latents=4).mean
            b = net_b.encode(pts, nrm, pts[:, :10], nrm[:, :10], num_latents=12, num_sharp_latents=4).mean
            assert torch.allclose(a, b, atol=1e-5)
            assert torch.allclose(net_a.query(net_a.decode(lat), pts), net_b.query(net_b.decode(lat), pts), atol=1e-5)
