"""Checkpoints: atomic, rotated, resumable.

Layout under ``run.dir/checkpoints/``::

    step_00000100/            one complete checkpoint
        model.pt optimizer.pt scheduler.pt ema.pt   (written by the engine: its native format)
        rank_00000.pt ...     per-rank RNG states (torch, numpy, python, cuda) and loader cursor
        config.yaml           the resolved config
        meta.json             step, world size, MLflow run id, metric, extra state, file list -- written LAST
    latest                    text file naming the newest complete checkpoint
    .tmp-step_00000200/       a checkpoint being written (never read)

A checkpoint is written into a temporary directory and renamed into place, so a crash leaves either
the old state or a ``.tmp-`` directory. ``meta.json`` lists every file; a directory whose meta.json is
missing or whose files are not all present is incomplete and ignored by ``resume=auto``.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.typed_config import save_config
from trainer.ema import EMA
from trainer.engines import Engine, read_full_state
from trainer.engines.resolve import resolved_header

STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


# ---------------------------------------------------------------------------
# RNG state of this process
# ---------------------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------

def read_meta(path: Path) -> dict[str, Any] | None:
    """meta.json of a complete checkpoint directory, else None."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    if not meta.get("complete") or not all((path / f).exists() for f in meta.get("files", [])):
        return None
    return meta


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and read_meta(p) is not None]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint named by ``latest`` if complete, else the newest complete one."""
    pointer = root / LATEST
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if read_meta(candidate) is not None:
            return candidate
    done = complete_checkpoints(root)
    return done[-1] if done else None


def resolve_resume(root: Path, resume: str) -> Path | None:
    """``auto``: the latest complete checkpoint (None for a fresh run); ``never``: None; else that path
    (a step, run or checkpoints/ directory, see :func:`resolve_checkpoint`)."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    return resolve_checkpoint(resume, "run.resume", exported=False)


def resolve_checkpoint(path: str | Path, key: str = "checkpoint", exported: bool = True) -> Path:
    """The checkpoint a user means by ``path``: a complete step directory, a `shapeflow export`
    .safetensors file (if ``exported``), or the latest complete checkpoint of a run directory or of its
    ``checkpoints/`` folder (as ``run.resume=auto`` finds it). Says on stderr which one it picked when
    that is not ``path`` itself; raises FileNotFoundError naming ``key`` and the accepted forms."""
    path = Path(path)
    if exported and path.is_file() and path.suffix == ".safetensors":
        return path
    if read_meta(path) is not None:
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root) if root.is_dir() else None
        if found is not None:
            print(f"shapeflow: {key}: using {found} (the latest complete checkpoint in {root})", file=sys.stderr)
            return found
    forms = "a step directory, a run directory, its checkpoints/ directory" + (
        " or a .safetensors file from `shapeflow export`" if exported else "")
    raise FileNotFoundError(f"{key}: {path} is not a complete checkpoint nor a directory holding one (no valid "
                            f"{META} in it or in a step_* directory under it); expected {forms}")


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------

def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(engine: Engine, root: Path, step: int, *, ema: EMA | None, loader_state: Any,
                    config: Any, meta_extra: dict[str, Any], metric: float | None, keep_last: int) -> Path:
    """Write a complete checkpoint for ``step`` (collective: every rank calls it)."""
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if engine.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    engine.barrier()
    files = engine.save_state(tmp, ema)
    torch.save({"rng": capture_rng(), "loader": loader_state}, tmp / rank_file(engine.rank))
    files += [rank_file(r) for r in range(engine.world_size)] + ["config.yaml"]
    engine.barrier()
    if engine.is_main:
        save_config(config, tmp / "config.yaml", resolved_header(meta_extra.get("resolved_from") or {}))
        meta = {"complete": True, "step": step, "world_size": engine.world_size, "strategy": engine.strategy,
                "metric": metric, "files": files, **meta_extra}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. the final step equals a periodic one)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_text_atomic(root / LATEST, final.name)
        rotate(root, keep_last)
    engine.barrier()
    return final


def rotate(root: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` and the best (lowest metric)."""
    done = complete_checkpoints(root)
    keep = set(done[-keep_last:])
    scored = [(read_meta(p)["metric"], p) for p in done if read_meta(p)["metric"] is not None]
    if scored:
        keep.add(min(scored, key=lambda mp: mp[0])[1])
    removed = [p for p in done if p not in keep]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

def load_checkpoint(engine: Engine, path: Path, *, ema: EMA | None) -> tuple[dict[str, Any], Any]:
    """Restore engine state, EMA and this rank's RNG; returns (meta, this rank's loader state)."""
    meta = read_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint")
    saved = meta.get("strategy", "ddp")
    if saved != engine.strategy:   # each engine reads only its own native format
        raise ValueError(f"{path} was written with engine.strategy={saved}; resume with that strategy "
                         f"(`shapeflow export` turns any strategy's checkpoint into one safetensors file)")
    engine.load_state(path, ema)
    own = path / rank_file(engine.rank)
    if meta["world_size"] == engine.world_size and own.exists():
        per_rank = torch.load(own, weights_only=False)
        restore_rng(per_rank["rng"])
        return meta, per_rank["loader"]
    # A different number of ranks: RNG streams cannot be mapped one to one (the loop reseeds); the
    # loader continues the old run's data stream from every old rank's cursor (docs/loader.md).
    return meta, gathered_loader_states(path, meta["world_size"])


def gathered_loader_states(path: Path, world_size: int) -> dict[str, Any] | None:
    """Every old rank's loader cursor as one gathered cursor (None when a rank saved none)."""
    states = []
    for rank in range(world_size):
        file = path / rank_file(rank)
        state = torch.load(file, weights_only=False)["loader"] if file.exists() else None
        if state is None:
            return None
        states.append(state)
    return {"ranks": states}


# ---------------------------------------------------------------------------
# The network's weights (loading networks for inference: trainer/inference.py)
# ---------------------------------------------------------------------------

NET_PREFIX = "net."  # the engine trains a task objective that holds the network as ``net``


def network_state(path: Path, use_ema: bool, meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The network's weights from a checkpoint of any strategy (EMA parameters over the raw ones when
    asked), consolidated into full tensors by the engine that wrote it."""
    meta = meta or read_meta(path) or {}
    return network_weights(read_full_state(path, meta.get("strategy", "ddp"), use_ema))


def network_weights(objective_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's entries of a task objective's state dict, without the ``net.`` prefix."""
    return {k[len(NET_PREFIX):]: v for k, v in objective_state.items() if k.startswith(NET_PREFIX)}
