"""``fastvae two-stage RUN``: train a second-stage VAE on the run's latent space and report the variance loss.

The second stage is a run folder of its own, ``RUN/two_stage/`` (``checkpoint.pt``, ``metrics.*``), trained with
the same loop and loss as the first; an existing one is reused unless ``--overwrite``. The command then writes
``RUN/two_stage/report.json`` (the variance of generated latents and images per generation setting),
``samples.png`` (one row per setting, the same draws) and ``variance.png`` (per-dimension latent variances).
``--latents active`` trains the second stage on the first stage's active variables only, into
``RUN/two_stage_active/`` (with ``latents.json`` naming them); at generation the inactive variables are filled
with prior noise or zeros. ``--out FOLDER`` puts the second stage elsewhere, leaving RUN untouched.
"""
from __future__ import annotations

import argparse
import json
import os

from ._common import check_minimum, load_run, output_path, run_data, seed_value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "two-stage", help="train a second-stage VAE on a run's latents; generate with renormalization",
        description="Encode the run's training set, train a SecondStageVAE on the codes (fresh z ~ q(z|x) each epoch, "
                    "or the means), then generate u ~ N(0, I) -> second decoder -> renormalization (none, per_dim, "
                    "scalar) -> first decoder, and report the variance loss of each setting.")
    parser.add_argument("run_dir", metavar="RUN", help="a run folder written by fastvae train")
    parser.add_argument("--source", choices=("sample", "mean"), default="sample",
                        help="train on draws of q(z|x), redrawn each epoch, or on the means mu (default: sample)")
    parser.add_argument("--latents", choices=("all", "active"), default="all",
                        help="model every first-stage variable, or the active ones only (inactive ones filled with "
                             "N(0, 1) noise or zeros at generation; default: all)")
    parser.add_argument("--epochs", type=int, default=20, help="second-stage epochs (default: 20)")
    parser.add_argument("--batch-size", type=int, default=None, help="second-stage batch size (default: the run's)")
    parser.add_argument("--lr", type=float, default=None, help="second-stage learning rate (default: the run's)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256], metavar="N",
                        help="second-stage hidden widths (default: 256 256)")
    parser.add_argument("--latent", type=int, default=None, help="second-stage latent dimension (default: the run's)")
    parser.add_argument("--n", type=int, default=10000,
                        help="samples generated per setting for the report (default: 10000)")
    parser.add_argument("--seed", type=seed_value, default=0, help="seed of training and generation (default: 0)")
    parser.add_argument("--device", default="cpu", help="device (default: cpu)")
    parser.add_argument("--overwrite", action="store_true",
                        help="retrain even when RUN/two_stage already holds a second stage")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bar while training (default: on)")
    parser.add_argument("--out", default=None, metavar="FOLDER",
                        help="the second stage's folder (default: RUN/two_stage, or RUN/two_stage_active); one "
                             "elsewhere leaves RUN untouched, so that a read-only run can be studied")
    parser.set_defaults(func=run, parser=parser)


def run(args) -> int:
    from fastvae import plots, two_stage

    parser = args.parser
    check_minimum(parser, args, 1, "epochs", "n")
    if args.n < 2:
        parser.error("--n must be at least 2 (renormalization works over the generated batch)")
    first, config = load_run(parser, args.run_dir, args.device)
    images, _ = run_data(config)
    active = args.latents == "active"
    folder = str(output_path("two-stage", args))
    if args.out is not None:  # reuse only a second stage of the run's current checkpoint, as under RUN/
        from fastvae.train.runfolder import matches_checkpoint

        reusable = not args.overwrite and matches_checkpoint(folder, args.run_dir)
        args.overwrite = not reusable

    variables = None
    if active:
        found = None if args.overwrite else (two_stage.load_active_second_stage(args.run_dir, device=args.device)
                                             if args.out is None else _load_out(folder, args.device))
        second, variables = found if found is not None else (None, two_stage.active_variables(first, images))
        if not variables:
            parser.error("the run's model has no active variable: nothing for a second stage on active latents")
        print(f"fastvae two-stage: active variables {variables} ({len(variables)} of {first.latent_dim})")
    else:
        second = None if args.overwrite else (two_stage.load_second_stage(args.run_dir, device=args.device)
                                              if args.out is None else _load_out(folder, args.device)[0])
    if second is not None:
        print(f"fastvae two-stage: reusing the second stage in {folder} (--overwrite retrains it)")
        target = two_stage.aggregate_posterior(first, images)
    else:
        overrides = {"epochs": args.epochs, "seed": args.seed, "device": args.device, "hidden": args.hidden,
                     "overwrite": True, "progress": args.progress}
        if active:
            overrides["latent"] = len(variables)
        for name in ("batch_size", "lr", "latent"):
            if getattr(args, name) is not None:
                overrides[name] = getattr(args, name)
        try:
            second_config = two_stage.second_stage_config(config, folder, **overrides)
        except (ValueError, TypeError) as error:
            parser.error(str(error))
        width = len(variables) if active else first.latent_dim
        print(f"fastvae two-stage: training a second stage {width}-{'-'.join(map(str, args.hidden))}-"
              f"{second_config.latent} on {images.shape[0]} codes ({args.source}) for {args.epochs} epochs "
              f"into {folder}")
        second, result, target = two_stage.train_second_stage(first, images, second_config, source=args.source,
                                                              variables=variables, run_dir=args.run_dir)
        metrics = result.test_metrics
        print(f"fastvae two-stage: second stage done: loss {metrics.get('loss', float('nan')):.4g}, "
              f"MSE {metrics.get('mse', float('nan')):.4g}")

    if active:
        latents = two_stage.active_setting_latents(first, second, variables, args.n, target, seed=args.seed)
    else:
        latents = two_stage.setting_latents(first, second, args.n, target, seed=args.seed)
    report = two_stage.variance_report(first, second, images, n=args.n, target=target, latents=latents)
    report.update({"run": os.path.abspath(args.run_dir), "source": args.source, "latents": args.latents,
                   "variables": variables})
    print("variance loss (generated vs real):")
    print(two_stage.format_variance_report(report))
    with open(os.path.join(folder, "report.json"), "w") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")

    rows = {"aggregate posterior": report["aggregate_posterior"]["var"]}
    rows.update({name: row["latent_var"] for name, row in report["settings"].items()})
    plots.variance_bars(rows, os.path.join(folder, "variance.png"))
    written = ["report.json", "variance.png"]
    if len(first.input_shape) == 3:
        plots.image_rows([two_stage.decode_all(first, z[:16]) for z in latents.values()],
                         os.path.join(folder, "samples.png"), titles=list(latents))
        written.append("samples.png")
    print(f"fastvae two-stage: wrote {', '.join(written)} to {folder}")
    return 0


def _load_out(folder: str, device: str):
    """``(second, variables)`` of a second stage trained into ``--out FOLDER`` (variables: None for all latents)."""
    import fastvae

    second, _ = fastvae.load(folder, device=device)
    latents = os.path.join(folder, "latents.json")
    return second, (json.load(open(latents))["variables"] if os.path.isfile(latents) else None)
