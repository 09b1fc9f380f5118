"""``shapeflow inspect DIR [--verify]``: summarise a shard directory and write a preview PNG; exit 1 on a
shard that cannot be read or disagrees with the manifest, and with ``--verify`` on any sample whose
member bytes fail the checksum recorded at preprocessing (every damaged sample is listed)."""
from __future__ import annotations

import argparse
from pathlib import Path

from data_pipeline.inspect import failures_summary, quality_summary, report, scan, write_preview


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="shard directory with manifest.json (or a manifest, a shard, a brace URL)")
    parser.add_argument("--out", default="shapeflow_inspect.png", help="preview PNG path (default: %(default)s)")
    parser.add_argument("--verify", action="store_true",
                        help="check every member of every sample against its recorded checksum")
    parser.add_argument("--num-preview", type=int, default=4, help="samples shown in the preview (default: 4)")


def run(args: argparse.Namespace) -> int:
    summary = scan(args.source, args.num_preview, verify=args.verify)
    lines, problems = report(summary)
    lines += quality_summary(summary)
    if Path(args.source).is_dir():
        lines += failures_summary(args.source)
    print("\n".join(lines))
    write_preview(summary, args.out)
    print(f"preview: {Path(args.out).resolve()}")
    if problems:
        print(f"shapeflow inspect: {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems))
        return 1
    return 0
