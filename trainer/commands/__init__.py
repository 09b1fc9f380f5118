"""The ``shapeflow`` console script: one sub-command per job.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so
``shapeflow --help`` stays fast and a missing optional dependency only affects
the command that needs it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from data_pipeline.typed_config import ConfigError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "preprocess": ("trainer.commands.preprocess", "meshes -> watertight SDF samples -> WebDataset shards"),
    "reshard": ("trainer.commands.reshard", "compact training shards holding only what a task's steps read"),
    "inspect": ("trainer.commands.inspect", "summarise a shard directory and write a preview PNG"),
    "train": ("trainer.commands.train", "train a VAE or a DiT from a YAML config"),
    "sample": ("trainer.commands.sample", "sample meshes from a DiT checkpoint"),
    "eval": ("trainer.commands.eval", "VAE reconstruction metrics on a shard set"),
    "export": ("trainer.commands.export", "consolidate a (sharded) checkpoint into one safetensors file"),
    "import": ("trainer.commands.import_", "a released model (Hunyuan3D-2.1 VAE, PartPacker VAE/DiT) as a shapeflow file"),
    "demo": ("trainer.commands.demo", "run the whole pipeline on the bundled meshes"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shapeflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
        # add_arguments is imported lazily only for the chosen command (see main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Two-stage parse: find the command, then let its module declare its arguments.
    if argv and argv[0] in COMMANDS:
        name = argv[0]
        module = importlib.import_module(COMMANDS[name][0])
        cmd_parser = argparse.ArgumentParser(prog=f"shapeflow {name}", description=COMMANDS[name][1])
        module.add_arguments(cmd_parser)
        args = cmd_parser.parse_args(argv[1:])
        try:
            return int(module.run(args) or 0)
        except ConfigError as err:
            print(f"shapeflow {name}: config error: {err}", file=sys.stderr)
            return 2
        except (FileNotFoundError, NotADirectoryError, ValueError) as err:
            print(f"shapeflow {name}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"shapeflow {name}: interrupted", file=sys.stderr)
            return 130
    parser.parse_args(argv)  # prints usage / help / unknown command and exits
    return 2


if __name__ == "__main__":
    sys.exit(main())
