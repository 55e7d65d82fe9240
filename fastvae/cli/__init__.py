"""The ``fastvae`` command: one subcommand per module of this package.

Each module in ``COMMANDS`` defines ``register(subparsers)``, which adds its parser and sets
``func`` to the function that runs it (``func(args) -> int | None``).

``main`` is the one place that turns errors into what a user reads: a bad argument, a missing or damaged file, a
busy run folder, a device that is not there, a full disk, a read-only folder (any OSError), a MemoryError or a
RuntimeError gives one line ``fastvae COMMAND: error: ...`` on stderr and exit status 2, never usage text or a
traceback (``FASTVAE_DEBUG=1`` keeps the traceback). Commands that write into a run folder (``RUN``) hold its lock while
they run, and record in their output folder which checkpoint the outputs came from.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path

from ._common import has_run_output, output_path

COMMANDS = ("demo", "train", "analyze", "two_stage", "fid", "noise_injection", "latent_stats")

_DERIVED_FOLDERS = ("analyze", "two-stage", "noise-injection")


class UsageError(Exception):
    """A command's arguments or inputs are wrong; the message is the whole story."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and a pointer to ``--help``, not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastvae", description="Train and study variational autoencoders, fast.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def _expected_errors() -> tuple[type, ...]:
    from fastvae.train import CheckpointError, RunFolderBusy

    return (UsageError, ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError, CheckpointError, RunFolderBusy)


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


@contextlib.contextmanager
def _run_folder_guard(args):
    """A command that writes into ``args.run_dir`` holds its exclusive lock (and says so in one line when the
    folder is read-only); one whose outputs go elsewhere (``--out``) only takes the shared lock and writes
    nothing into the run. Afterwards the derived output folder records the checkpoint it came from."""
    command = getattr(args, "command", None)
    run_dir = getattr(args, "run_dir", None)
    if not has_run_output(command) or run_dir is None or not os.path.isdir(run_dir):
        yield
        return
    from fastvae.train.runfolder import read_lock, run_lock, writable, write_provenance

    output = output_path(command, args)
    if _inside(output, Path(run_dir)):
        if not writable(run_dir):
            raise UsageError(f"{run_dir} is read-only (or not writable by this user) and fastvae {command} writes "
                             f"{output} into it; pass --out with a path elsewhere")
        guard = run_lock(run_dir, f"fastvae {command}")
    else:
        guard = read_lock(run_dir)
    with guard:
        yield
        if command in _DERIVED_FOLDERS and output.is_dir():
            write_provenance(output, run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with _run_folder_guard(args):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\nfastvae {args.command}: interrupted", file=sys.stderr)
        return 130
    except (*_expected_errors(), OSError, MemoryError, RuntimeError) as error:
        if os.environ.get("FASTVAE_DEBUG"):
            raise
        print(f"fastvae {args.command}: error: {error_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def error_line(error: BaseException) -> str:
    """The one line a user reads for ``error``: an OSError names its file and what the system said (a full disk
    says how much space is needed), a MemoryError what could not be allocated, others their first line."""
    if isinstance(error, OSError) and error.strerror:
        if error.filename is None or str(error.filename) in error.strerror:
            return error.strerror
        return f"{error.filename}: {error.strerror[:1].lower()}{error.strerror[1:]}"
    if isinstance(error, MemoryError):
        return f"out of memory ({error or 'an allocation failed'}); choose smaller sizes"
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
