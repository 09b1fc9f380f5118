"""engine.compile / trainer.compile_model: regional torch.compile gives the eager numbers.

Compilation on CPU costs tens of seconds per block type (C++ builds), so these tests are few and use
the debug presets. The 2-process DDP and FSDP2 runs with compilation are in tests/test_strategies.py
(strategies ``ddp_compiled`` and ``fsdp2_compiled`` against one eager process).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from train_fixtures import FAST

import models
import trainer
from trainer import compile as compile_mod
from trainer.config import load_train_config
from trainer.loop import train

pytestmark = pytest.mark.slow


def debug_inputs(name: str):
    g = torch.Generator().manual_seed(1)
    if name.startswith("vecset_vae"):
        pts = lambda n: torch.rand(2, n, 3, generator=g) * 2 - 1  # noqa: E731
        return (pts(64), torch.randn(2, 64, 3, generator=g), pts(100), pts(64), torch.randn(2, 64, 3, generator=g))
    return torch.randn(2, 16, 8, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 32, generator=g)


def loss_and_grads(model, name: str):
    model.zero_grad(set_to_none=True)
    out = model(*debug_inputs(name), sample_posterior=False)[0] if "vae" in name else model(*debug_inputs(name))
    loss = out.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["vecset_vae/debug", "vecset_dit/debug"])
def test_compiled_model_gives_the_eager_loss_and_gradients(name, one_torch_thread):  # noqa: F811
    torch.manual_seed(0)
    eager = models.build(name)
    compiled = models.build(name)
    compiled.load_state_dict(eager.state_dict())
    assert trainer.compile_model(compiled) is compiled and compile_mod.is_compiled(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())   # checkpoints keep their keys
    if name.startswith("vecset_dit"):   # a fresh DiT predicts 0 (zero-init): give the gates some weight
        with torch.no_grad():
            for p in [*eager.parameters()]:
                p.add_(0.02 * torch.randn_like(p))
        compiled.load_state_dict(eager.state_dict())
    want_loss, want_grads = loss_and_grads(eager, name)
    for every in (0, 1):   # 1: activation checkpointing of every (compiled) block
        compiled.set_activation_checkpointing(every)
        loss, grads = loss_and_grads(compiled, name)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == want_grads.keys()
        for key, g in want_grads.items():
            torch.testing.assert_close(grads[key], g, rtol=1e-4, atol=1e-5, msg=f"{key} (checkpoint_every={every})")


def test_missing_compiler_falls_back_to_eager_with_a_warning(monkeypatch):
    monkeypatch.setattr(compile_mod, "compiler_problem", lambda device: "no C++ compiler on PATH")
    model = models.build("vecset_dit/debug")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert trainer.compile_model(model) is model
    assert not compile_mod.is_compiled(model)
    assert any("engine.compile" in str(w.message) and "no C++ compiler" in str(w.message) for w in caught)


def test_resume_of_a_compiled_run_equals_an_uninterrupted_one(train_shards, tmp_path, one_torch_thread):  # noqa: F811
    def config(run_dir, *extra):
        return load_train_config("vecset_vae_debug", [
            f"data.path={train_shards}", f"run.dir={run_dir}", *FAST, "engine.compile=true", "run.max_steps=4",
            "run.ckpt_every=2", "run.log_every=1", "run.eval_every=0", "eval.num_samples=1", *extra])

    reference = train(config(tmp_path / "ref"))["losses"]
    first = train(config(tmp_path / "cut", "run.max_steps=2"))["losses"]
    resumed = train(config(tmp_path / "cut"))["losses"]
    assert sorted(first) == [0, 1] and sorted(resumed) == [2, 3]
    got = {**first, **resumed}
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-7), step
