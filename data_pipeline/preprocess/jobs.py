"""Preprocessing jobs (the library behind ``shapeflow preprocess``): meshes -> watertight SDF samples -> shards.

INPUT: mesh files, folders (searched recursively) or .txt list files (one path per line).
Trailing ``key=value`` arguments override the config (e.g. ``watertight.resolution=512``).

Exit codes: 0 every mesh was written (or was already there); 3 some inputs failed (each has a line
in failures.jsonl, every other mesh was written); 2 usage or config error (nothing was done).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.preprocess.config import PreprocessConfig
from data_pipeline.preprocess.mesh_io import COMPANION_EXTENSIONS, MESH_EXTENSIONS
from data_pipeline.preprocess.pipeline import MeshTask, file_sha256, mesh_id
from data_pipeline.preprocess.shard_writer import JobOutput
from data_pipeline.preprocess.worker_pool import Outcome, run_pool
from data_pipeline.progress import progress
from data_pipeline.typed_config import config_hash, to_dict

# Usage and config errors (ConfigError, ValueError, FileNotFoundError) become exit code 2 in trainer.commands.
EXIT_OK, EXIT_SOME_FAILED = 0, 3
LIST_EXTENSIONS = (".txt", ".lst")


@dataclass(frozen=True)
class JobSpec:
    """Where this job writes, which part of the inputs it owns, and how it runs."""
    out: Path
    index: int
    count: int
    workers: int
    progress: bool


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

def run_jobs(inputs: list[str], out: Path, cfg: PreprocessConfig, *, workers: int = 1, job_index: int = 0,
             num_jobs: int = 1, progress: bool = True) -> int:
    """Preprocess this job's share of ``inputs`` into ``out``; returns the exit code (EXIT_OK or
    EXIT_SOME_FAILED). Raises ValueError on bad arguments before any work starts."""
    if not inputs:
        raise ValueError("no INPUT given (only key=value overrides)")
    if num_jobs < 1 or not 0 <= job_index < num_jobs:
        raise ValueError(f"--job-index must be in [0, --num-jobs) and --num-jobs >= 1, "
                         f"got {job_index} of {num_jobs}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    job = JobSpec(Path(out), job_index, num_jobs, workers, progress)
    mine = [(p, s) for p, s in discover(inputs) if job_of(s, num_jobs) == job_index]
    output = JobOutput(job.out, job_index, num_jobs, config_hash(cfg), to_dict(cfg),
                       cfg.shard_max_samples, cfg.shard_max_bytes)
    started = time.perf_counter()
    tasks, skipped, failures = _plan(mine, output)
    written = _process(tasks, cfg, job, output, failures)
    output.finish()
    _print_summary(job, len(mine), written, skipped, failures, time.perf_counter() - started)
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


def _process(tasks, cfg, job: JobSpec, output: JobOutput, failures: list[str]) -> int:
    bar = progress(len(tasks), f"preprocess job {job.index}/{job.count}", "mesh", enabled=job.progress and bool(tasks))
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
        run_pool(tasks, cfg, job.workers, on_outcome)
    finally:
        bar.close()
    return written


def _print_summary(job: JobSpec, assigned: int, written: int, skipped: int, failures: list[str], seconds: float) -> None:
    rate = written / seconds if seconds > 0 else 0.0
    print(f"shapeflow preprocess: job {job.index} of {job.count}: {assigned} inputs, {written} written, "
          f"{skipped} already done, {len(failures)} failed ({seconds:.1f} s, {rate:.2f} meshes/s) -> {job.out}")
    if failures:
        shown = ", ".join(failures[:5]) + (" ..." if len(failures) > 5 else "")
        print(f"  failed: {shown} (reasons in {job.out / 'failures.jsonl'})")
