"""`shapeflow import SOURCE SRC --out FILE.safetensors`: a released model as a shapeflow network.

SOURCE is one of trainer.interop.SOURCES. SRC is Hunyuan3D-2.1's VAE release folder (config.yaml +
model[.fp16].ckpt/.safetensors) or PartPacker's checkpoint file (pretrained/vae.pt, flow.pt) with
``--config NAME``. The output has the format of `shapeflow export` (weights + training config +
meta), so `model.init_from=FILE`, a DiT's `vae.checkpoint=FILE`, `shapeflow sample` and
`trainer.load_network(FILE)` read it; the anchor's own config and latent scale factor travel in the
meta (``interop``) so `shapeflow export --format SOURCE` can write the release layout back.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml

from trainer.interop import SOURCES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=SOURCES, help="which release layout SRC has")
    parser.add_argument("src", help="release folder (hunyuan3d-2.1-vae) or checkpoint file (partpacker-*)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--config", default="", help="PartPacker config name (part_woenc, big_parts_strict_pvae)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override anchor config keys (YAML values), e.g. for a non-release size")


def parse_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        options[key] = yaml.safe_load(value)
    return options


def overrides_of(net_cfg, preset: str) -> dict:
    """The fields of ``net_cfg`` that differ from the preset (what model.overrides must hold)."""
    import models

    base = models.config_for(preset)
    return {f.name: getattr(net_cfg, f.name) for f in dataclasses.fields(net_cfg)
            if getattr(net_cfg, f.name) != getattr(base, f.name)}


def run(args: argparse.Namespace) -> int:
    from trainer import interop
    from trainer.commands.export import write_file
    from trainer.config import TrainConfig

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out: {out} must end in .safetensors")
    net_cfg, state, anchor, scale = interop.read_source(args.source, Path(args.src), args.config,
                                                        parse_options(args.set))
    conv = interop.CONVERTERS[args.source]
    cfg = TrainConfig(task=conv.task)
    cfg.model.name, cfg.model.overrides = conv.model_name, overrides_of(net_cfg, conv.model_name)
    meta = {"step": 0, **interop.meta_of(args.source, anchor, scale)}
    write_file(out, state, cfg, meta, "imported", f"{args.source}:{args.src}")
    numel = sum(t.numel() for t in state.values())
    print(f"shapeflow import: {args.source} {args.src} -> {out} ({len(state)} tensors, {numel:,} values, "
          f"latent scale factor {scale})")
    return 0
