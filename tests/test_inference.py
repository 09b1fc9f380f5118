"""trainer/inference.py: the shared encode sees the VAE run's FPS prefix; conditions for sampling."""
from __future__ import annotations

import pytest
import torch

import models
from data_pipeline.typed_config import ConfigError
from trainer.config import ConditionConfig, TrainConfig
from trainer.inference import encode, sampling_condition, vae_num_surface


def test_encode_feeds_the_vecset_encoder_the_runs_surface_prefix_only():
    torch.manual_seed(0)
    vae = models.build("vecset_vae/debug", num_sharp_latents=0).eval()
    cfg = TrainConfig()
    cfg.data.options = {"num_surface": 160}
    assert vae_num_surface(cfg, vae) == 160
    surface, normals = torch.rand(2, 400, 3) * 2 - 1, torch.nn.functional.normalize(torch.randn(2, 400, 3), dim=-1)
    with torch.no_grad():
        full = encode(vae, cfg, {"surface": surface, "surface_normal": normals}).mean
        prefix = vae.encode(surface[:, :160], normals[:, :160]).mean
        everything = vae.encode(surface, normals).mean
    assert torch.equal(full, prefix)
    assert not torch.allclose(full, everything)   # the extra points would have changed the latents


def test_sampling_conditions_class_ids_embeddings_and_clear_errors():
    device = torch.device("cpu")
    classes = ConditionConfig(kind="class", num_classes=3)
    assert sampling_condition(classes, 4, device).tolist() == [0, 1, 2, 0]
    assert sampling_condition(classes, 2, device, class_id=2).tolist() == [2, 2]
    emb = ConditionConfig(kind="embedding")
    batch = {"condition": torch.randn(3, 16)}
    assert sampling_condition(emb, 2, device, batch=batch).shape == (2, 1, 16)
    with pytest.raises(ConfigError, match="condition.kind=embedding"):
        sampling_condition(emb, 2, device)
    assert sampling_condition(ConditionConfig(), 2, device) is None
