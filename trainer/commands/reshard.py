"""``shapeflow reshard SOURCE --out DIR --task vae [loader options]``: compact training shards that keep
only what a step of that task reads (data_pipeline/reshard.py; the choice is measured in docs/scaling.md)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_pipeline.reshard import reshard


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="shard directory with a manifest (or a manifest, shard paths, a brace URL)")
    parser.add_argument("--out", required=True, type=Path, help="directory for the compact shards")
    parser.add_argument("--task", choices=("vae", "dit"), required=True)
    parser.add_argument("--options", default="{}",
                        help='the loader task options as JSON, e.g. \'{"num_surface": 4096, "num_sharp": 4096}\' '
                             "(docs/loader.md; the loader defaults otherwise)")
    parser.add_argument("--pool", type=int, default=4,
                        help="rows kept per point set = pool x what one step draws (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query subsets (default: %(default)s)")
    parser.add_argument("--shard-max-samples", type=int, default=1000)


def run(args: argparse.Namespace) -> int:
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as err:
        raise ValueError(f"--options is not valid JSON ({err})") from err
    if not isinstance(options, dict):
        raise ValueError("--options must be a JSON object")
    result = reshard(args.source, args.out, args.task, options, pool=args.pool, seed=args.seed,
                     shard_max_samples=args.shard_max_samples)
    print(f"shapeflow reshard: {result['written']} samples written to {args.out} ({result['skipped']} already "
          f"there), {result['bytes_read'] / 1e6:.1f} MB read")
    return 3 if result["problems"] else 0
