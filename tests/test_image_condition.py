"""Image conditioning: the frozen DINOv2 encoder (a tiny random one saved locally, never downloaded),
condition dropout for CFG, and image-conditioned DiT training + `shapeflow sample --image`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_fixtures import FAST

import models
from data_pipeline.typed_config import ConfigError
from trainer import commands as cli
from trainer.config import load_train_config
from trainer.image_encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageEncoder,
    save_tiny_dinov2,
)
from trainer.loop import train
from trainer.tasks import BatchRandom, DitObjective


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("dino") / "tiny", image_size=56, hidden_size=32)


def test_encoder_composites_resizes_normalises_and_layer_norms(tiny_dinov2):
    encoder = ImageEncoder(str(tiny_dinov2), image_size=56, background=(1.0, 0.0, 0.0))
    clear = torch.zeros(1, 80, 80, 4, dtype=torch.uint8)                 # fully transparent RGBA
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    pixels = encoder.preprocess(clear)
    assert pixels.shape == (1, 3, 56, 56)
    assert torch.allclose(pixels, red.view(1, 3, 1, 1).expand_as(pixels), atol=1e-5)  # the background shows
    grey_rgb = torch.full((1, 56, 56, 3), 128, dtype=torch.uint8)        # RGB: used as given
    grey = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(encoder.preprocess(grey_rgb)[0, :, 0, 0], grey, atol=1e-5)
    tokens = encoder(torch.randint(0, 256, (2, 56, 56, 4), dtype=torch.uint8))
    assert tokens.shape == (2, 1 + 4 * 4, 32)                          # CLS + (56/14)^2 patches
    assert torch.allclose(tokens.mean(-1), torch.zeros(2, 17), atol=1e-4)   # layer norm, no affine
    assert torch.allclose(tokens.std(-1, unbiased=False), torch.ones(2, 17), atol=1e-3)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_encoder_cache_encodes_each_view_once(tiny_dinov2):
    encoder = ImageEncoder(str(tiny_dinov2), image_size=56, background=(1.0, 1.0, 1.0))
    encoder.cache = {}
    views = torch.randint(0, 256, (2, 56, 56, 4), dtype=torch.uint8)
    first = encoder.encode_views(views, ["a", "b"], torch.tensor([0, 3]))
    calls = []
    encoder.model.register_forward_hook(lambda *args: calls.append(1))
    again = encoder.encode_views(views.flip(0), ["b", "a"], torch.tensor([3, 0]))
    assert not calls and torch.allclose(again, first.flip(0), atol=1e-2)     # fp16 cache
    assert sorted(encoder.cache) == [("a", 0), ("b", 3)]


def test_recenter_makes_the_framing_irrelevant(tiny_dinov2):
    """condition.recenter: the same object drawn small in a corner, large in the middle or cut by the edge
    of the picture reaches the encoder as the same crop (object box centred, the margin on each side)."""
    sprite = torch.zeros(10, 20, 4, dtype=torch.uint8)
    sprite[..., 0], sprite[..., 3] = 200, 255                             # a red 10 x 20 box
    sprite[3:7, 5:9, :3] = 30                                             # with a dark spot off its centre

    def drawn_at(top: int, left: int, scale: int, size: int = 112) -> torch.Tensor:
        big = sprite.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        image = torch.zeros(1, size, size, 4, dtype=torch.uint8)
        image[0, top:top + big.shape[0], left:left + big.shape[1]] = big[:size - top, :size - left]
        return image

    encoder = ImageEncoder(str(tiny_dinov2), image_size=56, background=(1.0, 1.0, 1.0), recenter=0.1)
    corner, middle = encoder.preprocess(drawn_at(2, 70, 2)), encoder.preprocess(drawn_at(30, 16, 4))
    assert (corner - middle).abs().mean() < 0.05           # measured 0.003: resampling differs, nothing else
    white = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    rows_of_object = (middle[0] - white.view(3, 1, 1)).abs().amax(dim=(0, 2)) > 0.5
    drawn_rows = torch.nonzero(rows_of_object)[:, 0]
    # the box's long side spans (1 - 2 x 0.1) of the crop: 44.8 of 56 columns; its 10 x 20 shape puts its
    # 22.4 rows in the middle of the crop
    assert 15 <= drawn_rows[0] <= 18 and 38 <= drawn_rows[-1] <= 40
    plain = ImageEncoder(str(tiny_dinov2), image_size=56, background=(1.0, 1.0, 1.0))
    assert (plain.preprocess(drawn_at(2, 70, 2)) - plain.preprocess(drawn_at(30, 16, 4))).abs().mean() > 0.3
    cut = encoder.preprocess(drawn_at(100, 100, 2))                        # box partly outside: still a crop
    assert cut.shape == (1, 3, 56, 56) and torch.isfinite(cut).all()
    empty = torch.zeros(1, 112, 112, 4, dtype=torch.uint8)                 # nothing drawn: whole picture
    assert torch.allclose(encoder.preprocess(empty), plain.preprocess(empty))


def test_encoder_path_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="condition.image_encoder.*config.json"):
        ImageEncoder(str(tmp_path), image_size=56, background=(1.0, 1.0, 1.0))


def test_cfg_dropout_rate_and_null_tokens():
    """Measured on the training path: BatchRandom's mask, then DitObjective swapping in the null tokens."""
    p, batch, steps = 0.1, 8, 500
    drops = torch.cat([BatchRandom(0, step, 0, 0, 1, batch, torch.device("cpu")).dropout(p) for step in range(steps)])
    rate = drops.float().mean().item()
    assert abs(rate - p) < 3 * (p * (1 - p) / drops.numel()) ** 0.5, rate   # within 3 sigma of 0.1
    net = models.build("vecset_dit/debug", condition="tokens", condition_dim=32)
    seen = []
    net.trunk.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
    cond = torch.randn(batch, 17, 32)
    drop = torch.tensor([True, False] * 4)
    x0 = torch.randn(batch, 16, net.config.in_channels)
    DitObjective(net)(x0, torch.randn_like(x0), torch.rand(batch), cond, drop)
    null = net.null_condition(1, 17)[0]
    assert torch.equal(seen[0][drop], null.expand(4, 17, 32))
    assert torch.equal(seen[0][~drop], cond[~drop])


@pytest.mark.slow
def test_image_dit_trains_and_samples_from_a_png(train_shards, tmp_path, tiny_dinov2):  # noqa: F811
    vae_dir = tmp_path / "vae"
    train(load_train_config("vecset_vae_debug", [f"data.path={train_shards}", f"run.dir={vae_dir}", *FAST,
                                                 "run.max_steps=2", "run.eval_every=0"]))
    run_dir = tmp_path / "dit"
    summary = train(load_train_config("vecset_dit_debug", [
        f"data.path={train_shards}", f"run.dir={run_dir}", f"vae.checkpoint={vae_dir}/checkpoints/step_00000002",
        *FAST, "data.options={}", "run.max_steps=2", "condition.kind=image", f"condition.image_encoder={tiny_dinov2}",
        "condition.image_size=56", "condition.cache=true", "condition.train_views=[0, 1, 2]",
        "condition.eval_view=3", "eval.guidance=3.0"]))
    assert summary["step"] == 2 and summary["skipped_steps"] == 0
    assert (run_dir / "eval" / "step_00000002" / "condition_00.png").exists()   # condition | sample
    picture = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 90, 4), dtype=np.uint8)).save(picture)
    out = tmp_path / "samples"
    rc = cli.main(["sample", str(run_dir / "checkpoints" / "step_00000002"), "--image", str(picture),
                   "--guidance", "2", "--steps", "2", "--resolution", "16", "--out", str(out)])
    assert rc == 0
    listing = json.loads((out / "samples.json").read_text())
    assert listing["conditions"] == [str(picture)]
    assert listing["empty"] == 1 or (out / "sample_00.glb").stat().st_size > 0
    assert (out / "sample_00.png").exists() and (out / "condition_00.png").exists()
    assert cli.main(["sample", str(run_dir / "checkpoints" / "step_00000002"), "--out", str(out)]) == 2
