"""The frozen image encoder of ``condition.kind=image``: DINOv2 through ``transformers``.

Views come from the loader as uint8 RGBA [B, S, S, 4] (alpha = coverage) or from a user's picture.
Preprocessing follows the anchors: composite RGBA on a background colour, optionally recentre (crop a
square around the object's alpha box with a margin, as Hunyuan3D-2 and TRELLIS prepare input pictures, so
the object fills the encoder's patches however it was framed), resize (bicubic, antialiased) to the
encoder's input size, ImageNet mean/std. The condition tokens are ``last_hidden_state`` (the CLS
token then the patch tokens, [B, 1 + (size/14)^2, D]) layer-normalised without affine parameters, what
the DiT's cross-attention reads.

Weights are loaded with ``Dinov2Model.from_pretrained(condition.image_encoder)``: a local folder in
``save_pretrained`` format, or a hub id (downloaded by transformers into its cache on first use; tests
and the demo only use local folders of a tiny randomly initialised model, see :func:`save_tiny_dinov2`).

``condition.cache=true``: features are computed once per (sample id, view index) and kept in this
process's memory (CPU, float16), so each rank holds the features of the views it has seen; nothing is
written to disk and a restarted run recomputes them. Memory: views x (1 + P) x D x 2 bytes per sample
(DINOv2-L at 518 px: 8 x 1370 x 1024 x 2 = 22 MB), so caching suits small data sets and debug runs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.typed_config import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageEncoder(nn.Module):
    """Frozen DINOv2: uint8 RGBA/RGB images [B, H, W, 3|4] -> condition tokens [B, 1 + P, D]."""

    def __init__(self, source: str, image_size: int, background: tuple[float, float, float],
                 recenter: float | None = None):
        super().__init__()
        self.recenter = recenter
        self.model = load_dinov2(source)
        self.model.requires_grad_(False)
        self.model.eval()
        self.image_size = image_size
        self.register_buffer("background", torch.tensor(background, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.cache: dict[tuple[str, int], Tensor] | None = None

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True):          # frozen: always in eval mode (no dropout)
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 [B, H, W, 4] (composited on the background) or [B, H, W, 3] (used as given)
        -> normalised float [B, 3, size, size]."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[1] == 4:
            alpha = x[:, 3:]
            x = x[:, :3] * alpha + self.background * (1 - alpha)
            if self.recenter is not None:       # crops differ in size: each is resized on its own
                x = torch.cat([self.resize(self.crop_to_object(rgb, a[0])[None]) for rgb, a in zip(x, alpha)])
        elif x.shape[1] != 3:
            raise ValueError(f"image encoder expects RGB or RGBA images [B, H, W, 3|4], got {tuple(images.shape)}")
        return (self.resize(x) - self.mean) / self.std

    def resize(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 3, size, size] (bicubic, antialiased)."""
        if x.shape[-2:] == (self.image_size, self.image_size):
            return x
        return F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                             antialias=True).clamp(0, 1)

    def crop_to_object(self, rgb: Tensor, alpha: Tensor) -> Tensor:
        """Composited [3, H, W] -> [3, S, S]: the square around the box of alpha > 0, widened so that the
        box keeps ``recenter`` of S free on each side; outside the picture is background. An empty alpha
        (nothing drawn) keeps the whole picture."""
        rows, cols = torch.nonzero(alpha.amax(dim=1) > 0)[:, 0], torch.nonzero(alpha.amax(dim=0) > 0)[:, 0]
        if rows.numel() == 0:
            return rgb
        box = max(int(rows[-1] - rows[0]), int(cols[-1] - cols[0])) + 1
        side = max(int(round(box / (1.0 - 2.0 * self.recenter))), 1)
        top = (int(rows[0] + rows[-1]) + 1 - side) // 2           # centre of the box, in pixel rows
        left = (int(cols[0] + cols[-1]) + 1 - side) // 2
        canvas = self.background[0].expand(3, side, side).clone()
        height, width = rgb.shape[-2:]
        y0, y1, x0, x1 = max(top, 0), min(top + side, height), max(left, 0), min(left + side, width)
        canvas[:, y0 - top:y1 - top, x0 - left:x1 - left] = rgb[:, y0:y1, x0:x1]
        return canvas

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        hidden = self.model(pixel_values=self.preprocess(images)).last_hidden_state   # [B, 1 + P, D]
        return F.layer_norm(hidden.float(), (hidden.shape[-1],))

    @torch.no_grad()
    def encode_views(self, views: Tensor, ids: list[str], indices: Tensor) -> Tensor:
        """Tokens of loader views; with the cache on, each (id, view) is encoded once per process."""
        if self.cache is None:
            return self(views)
        keys = [(sample_id, int(i)) for sample_id, i in zip(ids, indices.tolist())]
        missing = [n for n, key in enumerate(keys) if key not in self.cache]
        if missing:
            fresh = self(views[missing])
            for n, tokens in zip(missing, fresh):
                self.cache[keys[n]] = tokens.to("cpu", torch.float16)
        return torch.stack([self.cache[key] for key in keys]).to(views.device, torch.float32)


def load_dinov2(source: str) -> nn.Module:
    """``Dinov2Model.from_pretrained(source)``; a clear error when it cannot be loaded."""
    try:
        from transformers import Dinov2Model
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()   # no per-file bars in training logs
    except ImportError as err:
        raise ConfigError(f"condition.image_encoder: needs the transformers package ({err})") from None
    local = Path(source).expanduser()
    looks_local = local.exists() or source.startswith((".", "/", "~"))
    if looks_local and not (local / "config.json").is_file():
        raise ConfigError(f"condition.image_encoder: {source} is not a save_pretrained folder (no config.json)")
    try:
        return Dinov2Model.from_pretrained(str(local) if looks_local else source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"condition.image_encoder: cannot load DINOv2 from {source!r} ({err})") from None


def save_tiny_dinov2(folder: str | Path, image_size: int = 56, hidden_size: int = 32, seed: int = 0) -> Path:
    """A tiny randomly initialised DINOv2 (patch 14) in save_pretrained format, for tests and the demo
    (no weights can be downloaded there). Random features still tell shapes apart: the DiT learns the map."""
    from transformers import Dinov2Config, Dinov2Model
    config = Dinov2Config(image_size=image_size, patch_size=14, hidden_size=hidden_size, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=2 * hidden_size)
    with torch.random.fork_rng():           # the caller's random state is left as it was
        torch.manual_seed(seed)
        model = Dinov2Model(config)
    model.save_pretrained(str(folder))
    return Path(folder)


def image_from_file(path: str | Path) -> np.ndarray:
    """A user's picture as uint8 [H, W, 4] (RGBA, composited by the encoder) or [H, W, 3] (RGB, as given)."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            return np.asarray(image.convert("RGBA" if has_alpha else "RGB"), dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--image {path}: not a readable image ({err})") from None
