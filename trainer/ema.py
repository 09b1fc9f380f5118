"""Exponential moving average of the trainable weights, kept in fp32.

The EMA holds one fp32 copy per *local* parameter tensor, keyed by parameter name, and updates all
of them with one fused ``torch._foreach_lerp_``. Under a sharded strategy the local tensors are the
rank's shards, so the update needs no communication; under DDP (or one process) they are full tensors.
What "local" means is the engine's business: a DTensor's local shard (FSDP2, the default below), the
``ds_tensor`` partition of a DeepSpeed ZeRO-3 parameter, or the tensor itself.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a parameter (a DTensor's shard, or the tensor itself)."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], decay: float,
                 local: Callable[[torch.Tensor], torch.Tensor] = _local):
        pairs = [(name, p) for name, p in named_params if p.requires_grad]
        self.decay = decay
        self.local = local
        self.names = [name for name, _ in pairs]
        self.params = [p for _, p in pairs]
        self.shadow = [local(p).detach().float().clone() for p in self.params]

    def decay_at(self, num_updates: int | None) -> float:
        """The warm-up decay min(decay, (1 + n) / (10 + n)) for the n-th update (n from 1), so the
        random initial weights fade in the first few thousand steps instead of ~1 / (1 - decay).
        ``None``: the plain configured decay. n is the optimiser step, so a resumed run continues the ramp."""
        if num_updates is None:
            return self.decay
        return min(self.decay, (1.0 + num_updates) / (10.0 + num_updates))

    @torch.no_grad()
    def update(self, num_updates: int | None = None) -> None:
        """shadow <- d * shadow + (1 - d) * param with d = decay_at(num_updates)."""
        current = [self.local(p).detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay_at(num_updates))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{parameter name: fp32 tensor}; usable as a (partial) model state dict."""
        return {name: t.clone() for name, t in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state[name].to(self.shadow[i].device, torch.float32))

    @torch.no_grad()
    def copy_to(self, named_params: Iterable[tuple[str, nn.Parameter]]) -> None:
        """Write the averaged weights into parameters with the same names (e.g. an evaluation copy)."""
        by_name = dict(zip(self.names, self.shadow))
        for name, p in named_params:
            if name in by_name:
                _local(p).copy_(by_name[name].to(p.dtype))
