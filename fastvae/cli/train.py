"""``fastvae train`` (every ``TrainConfig`` field is a flag) and ``fastvae sample RUN``.

With no arguments ``fastvae train`` runs the default: a dense 784-256-64-32-16 VAE with the balanced loss on
Fashion-MNIST when its files are on the machine (else scikit-learn's digits), 20 epochs, into a new folder
runs/NAME. Under ``torchrun`` it initializes torch.distributed (NCCL on CUDA, gloo on CPU) and trains
data-parallel. Ctrl-C, SIGTERM, SIGHUP and SIGUSR1 write a checkpoint at the running step, print the command that
continues the run and exit with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys

from ._common import output_path, seed_value

# scikit-learn's digits (1500 images) need many more epochs than Fashion-MNIST for as many steps
DIGITS_FALLBACK = {"epochs": 300, "images_every": 25}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def register(subparsers) -> None:
    from fastvae.train.config import RESUMABLE, TrainConfig

    parser = subparsers.add_parser(
        "train", help="train a VAE (no arguments: the default dense VAE on Fashion-MNIST)",
        description="Train a VAE. Every option has a default; with none, a dense 784-256-64-32-16 VAE trains on "
                    "Fashion-MNIST (or scikit-learn's digits when Fashion-MNIST is not on this machine).",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its checkpoint "
                        f"(only {', '.join(map(_flag, RESUMABLE))} may change)")
    parser.add_argument("--config", metavar="JSON",
                        help="start from a TrainConfig saved as JSON (config.json of a run)")
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        choices = f"; one of {', '.join(meta['choices'])}" if meta["choices"] else ""
        text = f"{meta['help']}{choices} (default: {f.default})"
        if meta["kind"] is bool:
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, help=text)
        elif meta["kind"] is list:
            parser.add_argument(_flag(f.name), dest=f.name, type=int, nargs="+", metavar="N", help=text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, type=meta["kind"], metavar=f.name.upper(), help=text)
    parser.set_defaults(func=run_train)

    sample = subparsers.add_parser(
        "sample", help="write a grid of samples from a trained run",
        description="Decode z ~ N(0, I) with the model of run folder RUN and write a PNG grid.")
    sample.add_argument("run_dir", metavar="RUN", help="a run folder written by fastvae train")
    sample.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    sample.add_argument("--out", default=None, help="PNG path (default: RUN/samples.png)")
    sample.add_argument("--seed", type=seed_value, default=0, help="seed of the z draws (default: 0)")
    sample.add_argument("--nrow", type=int, default=None, help="images per row (default: about square)")
    sample.add_argument("--device", default="cpu", help="device to decode on (default: cpu)")
    sample.set_defaults(func=run_sample)


def _config(args, fields: dict):
    from fastvae.train.checkpoint import load_run_checkpoint
    from fastvae.train.config import RESUMABLE, TrainConfig

    if getattr(args, "resume", None) is not None:
        if getattr(args, "config", None) is not None:
            raise ValueError("--resume and --config cannot be combined: a resumed run keeps its saved config")
        fixed = sorted(set(fields) - set(RESUMABLE) - {"out", "dataset"})
        state = None if fixed else load_run_checkpoint(args.resume, on_fallback=lambda message: None)
        if state is not None:  # fit reports a fallback
            fields, moved = _repointed(args.resume, fields, state)
            fixed = [] if moved or "dataset" not in fields else ["dataset"]
        if fixed:
            raise ValueError(f"cannot change {', '.join(map(_flag, fixed))} when resuming; "
                             f"only {', '.join(map(_flag, RESUMABLE))} may change (and --dataset to the same "
                             "data moved elsewhere)")
        if "out" in fields and os.path.abspath(fields["out"]) != os.path.abspath(args.resume):
            raise ValueError("--out must be the resumed run's folder (or left out)")
        config = TrainConfig.from_dict({**state["config"], **fields, "out": args.resume})
        return config, state
    base = TrainConfig.load(args.config).to_dict() if getattr(args, "config", None) is not None else {}
    return TrainConfig.from_dict({**base, **fields}), None


def _repointed(run_dir: str, fields: dict, state: dict) -> tuple[dict, bool]:
    """``(fields, moved)``: ``fields`` with ``dataset`` set to where the run's dataset file is now (``--dataset
    NEW``, or the file of the same name under ``--data-root`` when the recorded path is gone), checked against the
    contents the run recorded; ``moved`` says that ``dataset`` may differ from the saved one."""
    from fastvae.train.runfolder import repoint_dataset

    saved, new = state["config"]["dataset"], fields.get("dataset")
    if new is not None and os.path.abspath(new) == saved:
        return {**fields, "dataset": saved}, True
    if not saved.endswith((".npy", ".npz")):
        return fields, False
    if new is None and "data_root" in fields and not os.path.isfile(saved):
        new = os.path.join(fields["data_root"], os.path.basename(saved))
    return (fields, False) if new is None else ({**fields, "dataset": repoint_dataset(run_dir, new)}, True)


def _dataset_recorder():
    """A callback that records the sha256 of the run's dataset file in the run folder, once, at the first step."""
    from fastvae.train.runfolder import DATASET_RECORD, record_dataset

    def record(out_dir, config, **_):
        if config.dataset.endswith((".npy", ".npz")) and not (out_dir / DATASET_RECORD).is_file():
            record_dataset(out_dir, config.dataset)

    return record


def run_train(args) -> int:
    import torch.distributed as dist

    from fastvae.data import resolve_dataset
    from fastvae.train import NonFiniteLossError, TrainConfig, TrainingInterrupted, train

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    config, state = _config(args, fields)
    resume = state is not None
    if resume and state["epoch"] >= config.epochs:
        print(f"fastvae train: {args.resume} already finished its {state['epoch']} epoch(s) ({state['step']} steps); "
              f"nothing to do. Train further with: fastvae train --resume {args.resume} --epochs N "
              f"(N > {state['epoch']})")
        return 0
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if distributed:
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() and config.device in ("auto", "cuda") else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if not resume and config.dataset == "auto" and resolve_dataset("auto", config.data_root) == "digits":
        config = dataclasses.replace(config, **{k: v for k, v in DIGITS_FALLBACK.items() if k not in fields})
    if not fields and not resume and getattr(args, "config", None) is None and rank == 0:
        print("fastvae train: no arguments, running the default: a dense VAE (hidden 256-64-32, latent 16) with the "
              f"balanced loss, {config.epochs} epochs (fastvae train --help lists the options)")
    try:
        model, result = train(config, resume=resume, echo=print, callbacks=[_dataset_recorder()])
    except NonFiniteLossError as error:
        print(f"fastvae train: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:
        if rank == 0:
            name = signal.Signals(stop.signum).name
            print(f"\nfastvae train: interrupted at step {stop.step} ({name}); checkpoint written. Continue with: "
                  f"fastvae train --resume {stop.out_dir}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        if rank == 0:
            print(f"\nfastvae train: interrupted{_resume_hint(config)}", file=sys.stderr)
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


def _resume_hint(config) -> str:
    from fastvae.train import CHECKPOINT

    if config.out is not None and os.path.isfile(os.path.join(config.out, CHECKPOINT)):
        return f"; continue from its last checkpoint with: fastvae train --resume {config.out}"
    return "; no checkpoint was written, so there is nothing to resume"


def run_sample(args) -> int:
    import torch

    import fastvae
    from fastvae.cli import UsageError
    from fastvae.train.grid import image_grid

    if args.n < 1:
        raise UsageError(f"--n must be positive, got {args.n}")
    model, _ = fastvae.load(args.run_dir, device=args.device)
    if len(model.input_shape) != 3 or model.input_shape[0] not in (1, 3):
        raise UsageError(f"the run's model makes vectors of shape {model.input_shape}, not images")
    out = str(output_path("sample", args))
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {out}: the folder {folder} does not exist")
    x = model.sample(args.n, generator=torch.Generator().manual_seed(args.seed))
    image_grid(x.float(), out, nrow=args.nrow)
    print(out)
    return 0
