"""The ``fastvae`` command: one subcommand per module of this package.

Each module in ``COMMANDS`` defines ``register(subparsers)``, which adds its parser and sets
``func`` to the function that runs it (``func(args) -> int | None``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "bench", "train", "analyze", "two_stage", "fid", "latent_stats")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvae", description="Train and study variational autoencoders, fast.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
