"""`shapeflow train CONFIG [key=value ...]`: train a VAE or a DiT (the config's ``task``).

CONFIG is a YAML file or the name of a bundled config (``configs/<name>.yaml``, e.g.
``vecset_vae_debug``). Overrides use dotted keys: ``data.path=shards/ run.dir=runs/x run.max_steps=100``.
The same command runs as one process, under ``torchrun`` and under ``accelerate launch``.

Exit codes: 0 done; 2 config or input error; 3 training diverged; 4 another rank died or hung;
5 the data cannot feed training (no readable samples: the line names the shards and why);
75 stopped by SIGTERM / SIGUSR1 after writing a checkpoint at the current step (run again to resume).
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
    from data_pipeline.loading.loader import NoReadableData
    from trainer.engines import describe_peer_failure
    from trainer.loop import TrainingDiverged, train  # heavy imports only once the config is valid
    from trainer.preemption import PREEMPTED_EXIT_CODE

    cfg = load_train_config(args.config, args.overrides)
    try:
        summary = train(cfg)
    except TrainingDiverged as err:
        print(f"shapeflow train: {err}", file=sys.stderr)
        return 3
    except NoReadableData as err:   # from a dataloader worker the message carries its traceback: last line
        line = str(err).strip().splitlines()[-1].split("NoReadableData: ")[-1]
        print(f"shapeflow train: data error: {line}", file=sys.stderr)
        return 5
    except Exception as err:  # a dead or hung peer: one clear line and a non-zero exit, no hang
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        reason = describe_peer_failure(err, cfg.engine.timeout_s) if distributed else None
        if reason is None:
            raise
        print(f"shapeflow train: rank {os.environ.get('RANK', '0')}: {reason}", file=sys.stderr)
        return 4
    data = ", ".join(f"{k[len('data_'):]} {int(v)}" for k, v in sorted(summary["data"].items()))
    if summary["preempted"]:
        print(f"shapeflow train: stopped by {summary['preempted']} at step {summary['step']} after writing its "
              f"checkpoint ({cfg.run.dir}); run again with run.resume=auto to continue; data: {data}")
        return PREEMPTED_EXIT_CODE
    print(f"shapeflow train: done at step {summary['step']} ({cfg.run.dir}); "
          f"MLflow run {summary['mlflow_run_id']}; skipped steps: {summary['skipped_steps']}; data: {data}")
    return 0
