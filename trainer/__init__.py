"""shapeflow's trainer: objectives, the training loop, engines, checkpoints, the CLI.

Public API::

    import trainer
    net = trainer.load_network(path)   # nn.Module in eval mode
    model = trainer.compile_model(model)   # regional torch.compile (what engine.compile=true applies)

``path`` is any checkpoint form (trainer/inference.py reads it): a step directory of any strategy, a run directory (its latest
complete checkpoint), a `shapeflow export` file or a `shapeflow import` file.
"""
from __future__ import annotations

from pathlib import Path

from trainer.compile import compile_model

__all__ = ["compile_model", "load_network"]


def load_network(path: str | Path, use_ema: bool = True):
    """The network stored at ``path`` (EMA weights when a checkpoint directory has them and
    ``use_ema``), built from its own config, in eval mode."""
    from trainer.inference import load_network as load  # lazy: importing trainer stays cheap

    return load(Path(path), use_ema)[0]
