"""``shapeflow preprocess INPUT... --out DIR``: meshes -> watertight SDF samples -> WebDataset shards.

INPUT: mesh files, folders (searched recursively) or .txt list files (one path per line).
Trailing ``key=value`` arguments override the config (e.g. ``watertight.resolution=512``).

Exit codes: 0 every mesh was written (or was already there); 3 some inputs failed (each has a line
in failures.jsonl, every other mesh was written); 2 usage or config error (nothing was done).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from tqdm import tqdm

from data_pipeline.mesh_io import COMPANION_EXTENSIONS, MESH_EXTENSIONS
from data_pipeline.preprocess import MeshTask, file_sha256, mesh_id
from data_pipeline.preprocess_config import PreprocessConfig
from data_pipeline.shard_writer import JobOutput
from data_pipeline.typed_config import config_hash, load_config, to_dict
from data_pipeline.worker_pool import Outcome, run_pool

# Usage and config errors (ConfigError, ValueError, FileNotFoundError) become exit code 2 in trainer.cli.
EXIT_OK, EXIT_SOME_FAILED = 0, 3
LIST_EXTENSIONS = (".txt", ".lst")


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


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------

def split_inputs(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments -> (inputs, overrides): ``key=value`` that is not an existing path overrides."""
    inputs, overrides = [], []
    for item in items:
        (overrides if "=" in item and not Path(item).exists() else inputs).append(item)
    return inputs, overrides


def discover(inputs: list[str]) -> list[tuple[str, str]]:
    """(path, source) of every candidate input, sorted by source. Folders give every file except
    hidden and companion files (materials, textures, docs); unknown formats stay in the list and
    are reported as failures."""
    found: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                rel = file.relative_to(path)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                if file.suffix.lower() in COMPANION_EXTENSIONS and file.suffix.lower() not in MESH_EXTENSIONS:
                    continue
                found.append((str(file), rel.as_posix()))
        elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    listed = Path(line) if Path(line).is_absolute() else path.parent / line
                    found.append((str(listed), line))
        elif path.is_file():
            found.append((str(path), path.name))
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    return sorted(found, key=lambda pair: (pair[1], pair[0]))


def job_of(source: str, num_jobs: int) -> int:
    """Stable job assignment from the source name alone (no file needs reading to decide)."""
    return int(hashlib.sha1(source.encode()).hexdigest()[:12], 16) % num_jobs


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    inputs, overrides = split_inputs(args.inputs)
    cfg = load_config(PreprocessConfig, args.config, overrides)   # ConfigError -> exit 2 in trainer.cli
    if not inputs:
        raise ValueError("no INPUT given (only key=value overrides)")
    if args.num_jobs < 1 or not 0 <= args.job_index < args.num_jobs:
        raise ValueError(f"--job-index must be in [0, --num-jobs) and --num-jobs >= 1, "
                         f"got {args.job_index} of {args.num_jobs}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    mine = [(p, s) for p, s in discover(inputs) if job_of(s, args.num_jobs) == args.job_index]
    output = JobOutput(Path(args.out), args.job_index, args.num_jobs, config_hash(cfg), to_dict(cfg),
                       cfg.shard_max_samples, cfg.shard_max_bytes)
    started = time.perf_counter()
    tasks, skipped, failures = _plan(mine, output)
    written = _process(tasks, cfg, args, output, failures)
    output.finish()
    _print_summary(args, len(mine), written, skipped, failures, time.perf_counter() - started)
    return EXIT_SOME_FAILED if failures else EXIT_OK


def _plan(mine, output: JobOutput):
    """Tasks still to do; inputs already in complete shards (or listed twice) are skipped."""
    done = output.done_ids()
    tasks, skipped, failures = [], 0, []
    for path, source in mine:
        try:
            identity = mesh_id(source, file_sha256(path))
        except OSError as err:
            output.fail(source, path, f"cannot read file ({err.strerror or err})")
            failures.append(source)
            continue
        if identity in done:
            skipped += 1
            continue
        done.add(identity)
        tasks.append(MeshTask(path=path, source=source, mesh_id=identity))
    return tasks, skipped, failures


def _process(tasks, cfg, args, output: JobOutput, failures: list[str]) -> int:
    bar = tqdm(total=len(tasks), unit="mesh", disable=args.no_progress or not tasks, file=sys.stderr,
               desc=f"preprocess job {args.job_index}/{args.num_jobs}")
    written = 0

    def on_outcome(outcome: Outcome) -> None:
        nonlocal written
        if outcome.sample is None:
            output.fail(outcome.task.source, outcome.task.path, outcome.reason)
            failures.append(outcome.task.source)
        else:
            output.write(outcome.sample)
            written += 1
        bar.update(1)
        bar.set_postfix(failed=len(failures))

    try:
        run_pool(tasks, cfg, args.workers, on_outcome)
    finally:
        bar.close()
    return written


def _print_summary(args, assigned: int, written: int, skipped: int, failures: list[str], seconds: float) -> None:
    rate = written / seconds if seconds > 0 else 0.0
    print(f"shapeflow preprocess: job {args.job_index} of {args.num_jobs}: {assigned} inputs, {written} written, "
          f"{skipped} already done, {len(failures)} failed ({seconds:.1f} s, {rate:.2f} meshes/s) -> {args.out}")
    if failures:
        shown = ", ".join(failures[:5]) + (" ..." if len(failures) > 5 else "")
        print(f"  failed: {shown} (reasons in {Path(args.out) / 'failures.jsonl'})")
