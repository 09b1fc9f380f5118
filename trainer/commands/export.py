"""`shapeflow export CHECKPOINT_DIR --out FILE.safetensors [--ema]`: one file from any checkpoint;
`shapeflow export CHECKPOINT --format hunyuan3d-2.1-vae|partpacker-vae|partpacker-dit --out DIR`: the
weights in a released model's own layout, for its own inference code (trainer/interop.py).

Consolidates a checkpoint written by any strategy into the network's full weights, in one process
without a process group: DDP (``model.pt``), DeepSpeed ZeRO-1/2/3 (zero_to_fp32 reading of the fp32
master partitions; EMA partitions merged) and FSDP2 (the DCP shards, resharded to full tensors). With
``--ema`` the EMA weights replace the trained ones. The file holds the network's state dict (keys as
``models.build(...).state_dict()``) and, in its metadata, the training config and the checkpoint's
meta, so `shapeflow sample` (and a DiT's ``vae.checkpoint``) can load it like a checkpoint directory.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from data_pipeline.typed_config import save_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory (run.dir/checkpoints/step_XXXXXXXX) of any strategy "
                        "(with --format also a run directory or an export / import .safetensors file)")
    parser.add_argument("--out", required=True, help="output .safetensors file (with --format: a directory)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    parser.add_argument("--format", default="shapeflow", choices=["shapeflow", *ANCHOR_FORMATS],
                        help="shapeflow (default): one safetensors file; else a released model's layout")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="with --format: weight dtype")


ANCHOR_FORMATS = ("hunyuan3d-2.1-vae", "partpacker-vae", "partpacker-dit")


def write_file(out: Path, state: dict[str, torch.Tensor], cfg, meta: dict, weights: str, source: str) -> None:
    """The shapeflow single-file format: the network's state dict, config and meta in the metadata."""
    from safetensors.torch import save_file

    tmp_yaml = out.with_name(f".{out.name}.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, tmp_yaml)
    header = {"shapeflow_config": tmp_yaml.read_text(), "shapeflow_meta": json.dumps(meta),
              "shapeflow_weights": weights, "shapeflow_source": source}
    tmp_yaml.unlink()
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=header)
    tmp.replace(out)   # never leave a half-written file under the final name


def export(checkpoint: Path, out: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    """Write the consolidated network of ``checkpoint`` to ``out``; returns the tensors written."""
    from data_pipeline.typed_config import load_config
    from trainer.checkpoint import network_state, read_meta, resolve_checkpoint
    from trainer.config import TrainConfig
    from trainer.engines import checkpoint_has_ema

    checkpoint = resolve_checkpoint(checkpoint, exported=False)   # a step, run or checkpoints/ directory
    meta = read_meta(checkpoint)
    if use_ema and not checkpoint_has_ema(checkpoint, meta):
        raise ValueError(f"--ema: {checkpoint} holds no EMA weights (trained with ema.enabled=false)")
    state = {k: v.contiguous() for k, v in network_state(checkpoint, use_ema, meta).items()}
    if not state:
        raise ValueError(f"{checkpoint}: no network weights found")
    cfg = load_config(TrainConfig, checkpoint / "config.yaml")
    write_file(out, state, cfg, meta, "ema" if use_ema else "model", str(checkpoint))
    return state


def export_anchor(checkpoint: Path, fmt: str, out: Path, use_ema: bool, dtype: torch.dtype) -> list[Path]:
    """Write the network of ``checkpoint`` (any form) in the ``fmt`` release layout under ``out``."""
    import models
    from trainer import interop
    from trainer.inference import network_spec, read_network

    state, cfg, meta = read_network(checkpoint, use_ema)
    name, overrides = network_spec(cfg, meta)
    net_cfg = models.config_for(name, **overrides)
    interop.check_exportable(fmt, net_cfg)
    anchor = (meta.get(interop.META_KEY) or {})
    anchor_config = anchor.get("anchor_config") if anchor.get("source") == fmt else None
    return interop.write_anchor(fmt, state, net_cfg, anchor_config, out, dtype)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.format != "shapeflow":
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        files = export_anchor(Path(args.checkpoint), args.format, out, args.ema, dtype)
        print(f"shapeflow export: {args.format} ({args.dtype}) -> {', '.join(str(f) for f in files)}")
        return 0
    if out.suffix != ".safetensors":
        raise ValueError(f"--out: {out} must end in .safetensors")
    state = export(Path(args.checkpoint), out, args.ema)
    numel = sum(t.numel() for t in state.values())
    print(f"shapeflow export: {len(state)} tensors, {numel:,} values ({'EMA' if args.ema else 'trained'} weights) "
          f"-> {out}")
    return 0
