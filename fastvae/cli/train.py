"""``fastvae train`` (every ``TrainConfig`` field is a flag) and ``fastvae sample RUN``.

With no arguments ``fastvae train`` runs the default: a dense 784-256-64-32-16 VAE with the balanced loss on
Fashion-MNIST when its files are on the machine (else scikit-learn's digits), 20 epochs, into runs/NAME.
Under ``torchrun`` it initializes torch.distributed (NCCL on CUDA, gloo on CPU) and trains data-parallel.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys

# fields that may change when a run is resumed; the others define the run and stay as saved
RESUMABLE = ("epochs", "max_steps", "progress", "tensorboard", "log_every", "checkpoint_every", "threads", "device",
             "eval_batch_size", "n_samples", "images_every", "download", "data_root")
# scikit-learn's digits (1500 images) need many more epochs than Fashion-MNIST for as many steps
DIGITS_FALLBACK = {"epochs": 300, "images_every": 25}


def _field_help() -> dict[str, str]:
    """The comment after each field of TrainConfig, as its flag's help."""
    from fastvae.train import TrainConfig

    lines = inspect.getsource(TrainConfig).splitlines()
    found = {}
    for line in lines:
        match = re.match(r"\s+(\w+): [^=]+=[^#]+#\s*(.+)$", line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def register(subparsers) -> None:
    from fastvae.train import TrainConfig

    parser = subparsers.add_parser(
        "train", help="train a VAE (no arguments: the default dense VAE on Fashion-MNIST)",
        description="Train a VAE. Every option has a default; with none, a dense 784-256-64-32-16 VAE trains on "
                    "Fashion-MNIST (or scikit-learn's digits when Fashion-MNIST is not on this machine).",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its checkpoint "
                        f"(only {', '.join('--' + f.replace('_', '-') for f in RESUMABLE)} may change)")
    parser.add_argument("--config", metavar="JSON", help="start from a TrainConfig saved as JSON (config.json of a run)")
    helps = _field_help()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        text = f"{helps.get(f.name, '')} (default: {default})".strip()
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=text)
        elif f.type == "Optional[list]":
            parser.add_argument(flag, dest=f.name, type=int, nargs="+", metavar="N", help=text)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, dest=f.name, type=kind, metavar=f.name.upper(), help=text)
    parser.set_defaults(func=run_train, parser=parser)

    sample = subparsers.add_parser("sample", help="write a grid of samples from a trained run",
                                   description="Decode z ~ N(0, I) with the model of run folder RUN and write a PNG grid.")
    sample.add_argument("run_dir", metavar="RUN", help="a run folder written by fastvae train")
    sample.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    sample.add_argument("--out", default=None, help="PNG path (default: RUN/samples.png)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the z draws (default: 0)")
    sample.add_argument("--nrow", type=int, default=None, help="images per row (default: about square)")
    sample.add_argument("--device", default="cpu", help="device to decode on (default: cpu)")
    sample.set_defaults(func=run_sample, parser=sample)


def _config(args, fields: dict):
    from fastvae.run import load_checkpoint
    from fastvae.train import TrainConfig

    if getattr(args, "resume", None) is not None:
        if getattr(args, "config", None) is not None:
            raise ValueError("--resume and --config cannot be combined: a resumed run keeps its saved config")
        fixed = sorted(set(fields) - set(RESUMABLE) - {"out"})
        if fixed:
            raise ValueError(f"cannot change {', '.join('--' + f.replace('_', '-') for f in fixed)} when resuming; "
                             f"only {', '.join('--' + f.replace('_', '-') for f in RESUMABLE)} may change")
        if "out" in fields and os.path.abspath(fields["out"]) != os.path.abspath(args.resume):
            raise ValueError("--out must be the resumed run's folder (or left out)")
        saved = load_checkpoint(args.resume)["config"]
        return TrainConfig.from_dict({**saved, **fields, "out": args.resume})
    base = TrainConfig.load(args.config).to_dict() if getattr(args, "config", None) is not None else {}
    return TrainConfig.from_dict({**base, **fields})


def run_train(args) -> int:
    import torch.distributed as dist

    from fastvae.data import resolve_dataset
    from fastvae.train import NonFiniteLossError, TrainConfig, train

    parser = args.parser
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    try:
        config = _config(args, fields)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if distributed:
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() and config.device in ("auto", "cuda") else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    fresh = getattr(args, "resume", None) is None
    if fresh and config.dataset == "auto" and resolve_dataset("auto", config.data_root) == "digits":
        config = dataclasses.replace(config, **{k: v for k, v in DIGITS_FALLBACK.items() if k not in fields})
    if not fields and fresh and getattr(args, "config", None) is None and rank == 0:
        print("fastvae train: no arguments, running the default: a dense VAE (hidden 256-64-32, latent 16) with the "
              f"balanced loss, {config.epochs} epochs (fastvae train --help lists the options)")
    try:
        model, result = train(config, resume=getattr(args, "resume", None) is not None, echo=print)
    except NonFiniteLossError as error:
        print(f"fastvae train: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        if rank == 0:
            print(f"\nfastvae train: interrupted; continue with: fastvae train --resume {config.out}", file=sys.stderr)
        return 130
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        metrics = result.test_metrics
        summary = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "mse", "gamma") if metrics.get(k) is not None)
        print(f"fastvae train: {result.epoch} epoch(s), {result.step} steps; {metrics.get('split', 'test')} {summary}")
        print(f"fastvae train: run folder {result.out_dir} (checkpoint.pt, metrics.jsonl, metrics.csv, images/); "
              f"load it with fastvae.load({str(result.out_dir)!r})")
    return 0


def run_sample(args) -> int:
    import torch

    import fastvae
    from fastvae.plots import image_grid

    parser = args.parser
    if args.n < 1:
        parser.error(f"--n must be positive, got {args.n}")
    try:
        model, _ = fastvae.load(args.run_dir, device=args.device)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if len(model.input_shape) != 3 or model.input_shape[0] not in (1, 3):
        parser.error(f"the run's model makes vectors of shape {model.input_shape}, not images")
    x = model.sample(args.n, generator=torch.Generator().manual_seed(args.seed))
    out = args.out or os.path.join(args.run_dir, "samples.png")
    image_grid(x.float(), out, nrow=args.nrow)
    print(out)
    return 0
