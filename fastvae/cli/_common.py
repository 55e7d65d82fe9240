"""What the run commands share: bound checks of their integer flags, the run they read and its data, and where
each writes by default."""
from __future__ import annotations

import argparse
from pathlib import Path

# commands that read the run folder RUN: what each writes without --out (derived outputs are folders that get a
# source.json); the one list of these defaults, read by the commands and by the CLI's lock and read-only checks
_DEFAULT_OUTPUTS = {
    "sample": lambda args: "samples.png",
    "analyze": lambda args: "analysis",
    "two-stage": lambda args: _two_stage_folder(args.latents == "active"),
    "noise-injection": lambda args: "noise_injection",
    "fid": lambda args: "fid.json",
}


def _two_stage_folder(active: bool) -> str:
    from fastvae import two_stage

    return two_stage.SUBDIR_ACTIVE if active else two_stage.SUBDIR


def output_path(command: str, args) -> Path:
    """Where ``command`` writes: ``--out``, or its default inside the run folder ``args.run_dir``."""
    return Path(args.out) if args.out else Path(args.run_dir) / _DEFAULT_OUTPUTS[command](args)


def has_run_output(command: str) -> bool:
    """Whether ``command`` reads a run folder and writes an output beside it."""
    return command in _DEFAULT_OUTPUTS


SEED_MAX = 2**63 - 1  # seeds travel as int64 (the kernels' Philox seed, torch's generators)


def seed_value(text: str) -> int:
    """An argparse type: a seed, an integer in [0, 2**63 - 1] (a bigger one overflows torch's int64)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: expected an integer") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"seed {text} is out of range: it must be in [0, 2**63 - 1]")
    return value


def check_minimum(parser: argparse.ArgumentParser, args: argparse.Namespace, minimum: int, *names: str) -> None:
    """A usage error naming the first flag of ``names`` below ``minimum`` (1: "must be positive", 0: ">= 0")."""
    words = "must be positive" if minimum == 1 else f"must be >= {minimum}"
    for name in names:
        value = getattr(args, name)
        if value < minimum:
            parser.error(f"--{name.replace('_', '-')} {words}, got {value}")


def load_run(parser: argparse.ArgumentParser, run_dir: str, device: str):
    """``fastvae.load(run_dir)`` -> ``(model, config)``; a run that cannot be read is a usage error."""
    import fastvae

    try:
        return fastvae.load(run_dir, device=device)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    except OSError as error:  # a permission problem, an I/O error: one line naming the file
        from . import error_line

        parser.error(error_line(error))


def run_data(config, split: str = "train"):
    """``(images, labels)`` of the run's data set, ``split``, as ``config`` names it: of the training split, the
    first ``config.limit`` images when the run trained on those only (``--limit``)."""
    from fastvae.data import load_dataset

    images, labels = load_dataset(config.dataset, config.data_root, split, download=config.download)
    if split == "train" and config.limit:
        images, labels = images[:config.limit], labels[:config.limit]
    return images, labels
