"""`shapeflow train CONFIG [key=value ...]`: train a VAE or a DiT (the config's ``task``).

CONFIG is a YAML file or the name of a bundled config (``configs/<name>.yaml``, e.g.
``vecset_vae_debug``). Overrides use dotted keys: ``data.path=shards/ run.dir=runs/x run.max_steps=100``.
The same command runs as one process, under ``torchrun`` and under ``accelerate launch``.
"""
from __future__ import annotations

import argparse
import os
import sys

from trainer.config import load_train_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file or bundled config name (e.g. vecset_vae_debug)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.path=shards run.dir=runs/x run.max_steps=100")


def run(args: argparse.Namespace) -> int:
    from trainer.engines import describe_peer_failure
    from trainer.loop import TrainingDiverged, train  # heavy imports only once the config is valid

    cfg = load_train_config(args.config, args.overrides)
    try:
        summary = train(cfg)
    except TrainingDiverged as err:
        print(f"shapeflow train: {err}", file=sys.stderr)
        return 3
    except Exception as err:  # a dead or hung peer: one clear line and a non-zero exit, no hang
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        reason = describe_peer_failure(err, cfg.engine.timeout_s) if distributed else None
        if reason is None:
            raise
        print(f"shapeflow train: rank {os.environ.get('RANK', '0')}: {reason}", file=sys.stderr)
        return 4
    print(f"shapeflow train: done at step {summary['step']} ({cfg.run.dir}); "
          f"MLflow run {summary['mlflow_run_id']}; skipped steps: {summary['skipped_steps']}")
    return 0
