"""``shapeflow preprocess INPUT... --out DIR``: meshes -> watertight SDF samples -> WebDataset shards.

INPUT: mesh files, folders (searched recursively) or .txt list files (one path per line).
Trailing ``key=value`` arguments override the config (e.g. ``watertight.resolution=512``).

Exit codes: 0 every mesh was written (or was already there); 3 some inputs failed (each has a line
in failures.jsonl, every other mesh was written); 2 usage or config error (nothing was done).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from data_pipeline.preprocess.config import PreprocessConfig
from data_pipeline.preprocess.jobs import run_jobs, split_inputs
from data_pipeline.typed_config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("exit codes: 0 all meshes written, 3 some inputs failed (see failures.jsonl), "
                     "2 usage or config error")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="mesh files, folders, .txt lists of paths; then optional key=value config overrides")
    parser.add_argument("--out", required=True, help="output folder for shards, manifest.json, failures.jsonl")
    parser.add_argument("--config", help="YAML with differences from the defaults (configs/preprocess/)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--job-index", type=int, default=0, help="this job's part of the inputs (0-based)")
    parser.add_argument("--num-jobs", type=int, default=1, help="number of disjoint parts (SLURM array size)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Overrides may follow the options (`INPUT --out DIR --config C key=value`), which plain
    # parse_args rejects for a nargs="+" positional; the intermixed parser accepts it.
    parser.parse_args = parser.parse_intermixed_args


def run(args: argparse.Namespace) -> int:
    inputs, overrides = split_inputs(args.inputs)
    cfg = load_config(PreprocessConfig, args.config, overrides)   # ConfigError -> exit 2 in trainer.commands
    return run_jobs(inputs, Path(args.out), cfg, workers=args.workers, job_index=args.job_index,
                    num_jobs=args.num_jobs, progress=not args.no_progress)
