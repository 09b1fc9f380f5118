"""Regional compilation: ``torch.compile`` on each repeated block instead of the whole network.

Every block of every ``CheckpointedBlocks`` list (transformer blocks of the DiTs and VecSet VAE, the
VAE's point and query cross-attention blocks, the voxel VAE's stages) gets its ``forward`` compiled.
Identical blocks share one compiled graph (same code, same guards), so warm-up costs about one block,
not depth x one block, and what stays eager (embedders, heads, the loss) is cheap.

Compiling ``forward`` (not the module) keeps everything around it as it was:
- state-dict keys do not change (no ``_orig_mod.`` prefix), so checkpoints, EMA names and resume
  are the same with and without compilation;
- module hooks stay eager: FSDP2's per-block all-gather hooks and activation checkpointing
  (``CheckpointedBlocks`` calls the block, whose compiled forward is then recomputed in backward);
- it is applied before DDP / FSDP2 / DeepSpeed wrap the model (the engines call it in ``prepare``).

Where the compiler cannot run (no C++ compiler for CPU inductor, no Triton for CUDA, an unsupported
Python), :func:`compile_model` warns once and returns the model unchanged (eager).
"""
from __future__ import annotations

import functools
import shutil
import warnings

import torch
from torch import nn

from models.layers import CheckpointedBlocks

_COMPILED = "_shapeflow_compiled"   # marker on a block whose forward is already compiled


@functools.cache
def compiler_problem(device_type: str) -> str | None:
    """Why torch.compile cannot run on ``device_type`` here, or None when it can."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version"
    if device_type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "Triton is not installed (needed by inductor on CUDA)"
    if device_type == "cpu":
        from torch._inductor import config
        compiler = config.cpp.cxx[-1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
        if compiler is None:   # inductor's default: $CXX or g++ / clang++ from PATH
            compiler = "g++"
        found = shutil.which(compiler) or shutil.which("g++") or shutil.which("clang++")
        return None if found else f"no C++ compiler ({compiler}, g++, clang++) on PATH (needed by inductor on CPU)"
    return f"no inductor backend known for device {device_type!r}"


def compiled_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks :func:`compile_model` compiles (every block of every CheckpointedBlocks)."""
    return [block for m in model.modules() if isinstance(m, CheckpointedBlocks) for block in m.blocks]


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(block, _COMPILED, False) for block in compiled_blocks(model))


def compile_model(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile each block's forward in place (regional compilation) and return ``model``.

    Idempotent; call it after moving the model to its device and before any distributed wrapper.
    Falls back to the eager model with a warning when the compiler is unavailable. ``backend`` is
    torch.compile's: ``inductor`` generates kernels (needs a C++ compiler on CPU, Triton on CUDA);
    ``aot_eager`` / ``eager`` only capture graphs (no code generation: quick, no speed-up).
    """
    params = next(model.parameters(), None)
    device_type = params.device.type if params is not None else "cpu"
    problem = compiler_problem(device_type) if backend == "inductor" else None
    if problem is not None:
        warnings.warn(f"engine.compile: {problem}; training runs eagerly (uncompiled)", RuntimeWarning, stacklevel=2)
        return model
    for block in compiled_blocks(model):
        if not getattr(block, _COMPILED, False):
            block.forward = torch.compile(block.forward, backend=backend)   # instance attribute: hooks and keys unchanged
            setattr(block, _COMPILED, True)
    return model
