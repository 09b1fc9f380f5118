"""Count the bytes each rank hands to torch.distributed collectives (for bench/scaling_model.py).

``install()`` wraps the Python collectives of ``torch.distributed`` (what DeepSpeed and FSDP2 call);
``count_ddp(model)`` makes DDP all-reduce its buckets through them (DDP's reducer otherwise calls the
process group from C++, below any Python wrapper). The *payload* of one call is the size of the full logical buffer:
the tensor of an all-reduce / reduce / broadcast, the gathered output of an all-gather, the input
of a reduce-scatter. Nested calls (``all_gather_single`` -> ``all_gather_into_tensor``) count once.
"""
from __future__ import annotations

import collections
import functools
import inspect
import threading

import torch
import torch.distributed as dist

# collective name -> (argument that holds the payload, how to size it)
PAYLOAD_ARGUMENT = {
    "all_reduce": "tensor", "reduce": "tensor", "broadcast": "tensor",
    "all_reduce_coalesced": "tensors",
    "all_gather": "tensor_list", "all_gather_into_tensor": "output_tensor", "_all_gather_base": "output_tensor",
    "all_gather_single": "output_tensor",
    "reduce_scatter": "input_list", "reduce_scatter_tensor": "input", "_reduce_scatter_base": "input",
    "reduce_scatter_single": "input",
}

counts: collections.Counter = collections.Counter()   # collective name -> payload bytes since reset()
_depth = threading.local()


def nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(nbytes(v) for v in value)  # a list of tensors


def _wrap(name: str, fn):
    signature = inspect.signature(fn)
    argument = PAYLOAD_ARGUMENT[name]

    @functools.wraps(fn)
    def counted(*args, **kwargs):
        outer = getattr(_depth, "value", 0) == 0
        if outer:
            counts[name] += nbytes(signature.bind_partial(*args, **kwargs).arguments[argument])
        _depth.value = getattr(_depth, "value", 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _depth.value -= 1
    return counted


def install() -> None:
    """Wrap every collective of PAYLOAD_ARGUMENT that this torch has (idempotent)."""
    for name in PAYLOAD_ARGUMENT:
        fn = getattr(dist, name, None)
        if fn is not None and not hasattr(fn, "__wrapped_by_comm_counter__"):
            wrapped = _wrap(name, fn)
            wrapped.__wrapped_by_comm_counter__ = True
            setattr(dist, name, wrapped)


def count_ddp(model) -> None:
    """DDP: route the gradient buckets through torch's default all-reduce hook, which calls the
    (wrapped) ``dist.all_reduce``; the same collective DDP's C++ reducer issues by itself."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    model.register_comm_hook(None, allreduce_hook)


def reset() -> dict[str, int]:
    """The counts so far (name -> bytes), then zero them."""
    snapshot = dict(counts)
    counts.clear()
    return snapshot
