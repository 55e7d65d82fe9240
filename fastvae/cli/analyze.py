"""``fastvae analyze RUN``: per-latent statistics, inactive variables, the stationary condition, zeroing check.

Writes into ``RUN/analysis/``: ``latents.json`` (the table, thresholds, the zeroing check), ``latents.png``
(bar chart), ``zeroing.png`` (samples with and without the inactive variables), ``latent_circles.png`` for a
2-D latent space, ``latent_3d.png`` (the means of 5,000 test images by class) and ``latent_slices.png`` (images
decoded from five horizontal slices of 25 points, ``fastvae.experiments.slice_latents``) for a 3-D one, and
``latent_evolution.png`` when the run recorded ``latent_evolution.json``.
"""
from __future__ import annotations

import json
import os

from ._common import check_minimum, load_run, output_path, run_data, seed_value


def register(subparsers) -> None:
    from fastvae.analysis import SIGMA2_MIN, TOLERANCE, VAR_MAX

    parser = subparsers.add_parser(
        "analyze", help="per-latent statistics of a trained run: sparsity and the stationary condition",
        description="For every latent variable j of the run's model, over a data split: Var(mu_j), E[sigma_j^2], their "
                    "sum (the stationary condition says ~1), mean KL and the reconstruction gain (MSE increase when "
                    "z_j is set to 0). Flags inactive variables and checks that zeroing them leaves samples unchanged.")
    parser.add_argument("run_dir", metavar="RUN", help="a run folder written by fastvae train")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="data split (default: train)")
    parser.add_argument("--limit", type=int, default=0, help="use the first LIMIT images only (default: 0, all)")
    parser.add_argument("--gain-samples", type=int, default=10000,
                        help="images for the reconstruction gain, D + 1 decodes each (default: 10000; 0: all)")
    parser.add_argument("--no-gain", action="store_true", help="skip the reconstruction gain")
    parser.add_argument("--sigma2-min", type=float, default=SIGMA2_MIN,
                        help=f"inactive when E[sigma^2] > this ... (default: {SIGMA2_MIN})")
    parser.add_argument("--var-max", type=float, default=VAR_MAX, help=f"... and Var(mu) < this (default: {VAR_MAX})")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="the stationary condition holds when every |Var(mu_j) + E[sigma_j^2] - 1| <= this "
                             f"(default: {TOLERANCE})")
    parser.add_argument("--samples", type=int, default=16, help="generated samples for the zeroing check (default: 16)")
    parser.add_argument("--seed", type=seed_value, default=0, help="seed of the zeroing check's z draws (default: 0)")
    parser.add_argument("--batch-size", type=int, default=500, help="images per batch (default: 500)")
    parser.add_argument("--device", default="cpu", help="device to run the model on (default: cpu)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/analysis)")
    parser.set_defaults(func=run, parser=parser)


def run(args) -> int:
    from fastvae import analysis, plots

    parser = args.parser
    check_minimum(parser, args, 0, "limit", "gain_samples")
    check_minimum(parser, args, 1, "samples", "batch_size")
    if args.tolerance < 0:
        parser.error(f"--tolerance must be >= 0, got {args.tolerance}")
    model, config = load_run(parser, args.run_dir, args.device)
    images, labels = run_data(config, args.split)
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    out = str(output_path("analyze", args))
    os.makedirs(out, exist_ok=True)

    stats = analysis.latent_statistics(
        model, images, batch_size=args.batch_size, gain=not args.no_gain, gain_limit=args.gain_samples or None,
        sigma2_min=args.sigma2_min, var_max=args.var_max, tolerance=args.tolerance)
    objective = f"KL {getattr(config, 'kl', 'full')}, {'sampling' if getattr(config, 'sampling', True) else 'z = mu'}"
    print(f"fastvae analyze: {config.model} VAE, latent {model.latent_dim} ({objective}), {config.dataset} "
          f"{args.split} "
          f"split ({stats.count} images; gain on {stats.extra['gain_count']})")
    print(stats.table())
    check = analysis.zeroing_check(model, stats.inactive, num_samples=args.samples, seed=args.seed, gain=stats.gain)
    print(check.summary())

    report = {"run": os.path.abspath(args.run_dir), "model": config.model, "dataset": config.dataset,
              "kl": getattr(config, "kl", "full"), "sampling": getattr(config, "sampling", True),
              "split": args.split, **stats.to_dict(), "zeroing_check": check.to_dict()}
    with open(os.path.join(out, "latents.json"), "w") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    written = ["latents.json"]
    plots.latent_bars(stats, os.path.join(out, "latents.png"))
    written.append("latents.png")
    if len(getattr(model, "input_shape", ())) == 3:
        rows, titles = [check.samples, check.zeroed], ["samples", f"{len(check.inactive)} inactive\nset to 0"]
        if check.reference is not None:
            rows.append(check.reference)
            titles.append(f"{len(check.reference_variables)} active\nset to 0")
        plots.image_rows(rows, os.path.join(out, "zeroing.png"), titles=titles,
                         title=f"mean |difference| with inactive variables zeroed: {check.mean_abs_diff:.5f}")
        written.append("zeroing.png")
    if model.latent_dim == 2:
        mu, logvar = analysis.encode_all(model, images[:2000])
        plots.latent_circles(mu, logvar, labels[:2000], os.path.join(out, "latent_circles.png"))
        written.append("latent_circles.png")
    if model.latent_dim == 3 and len(model.input_shape) == 3:
        written += _latent_3d(model, config, out)
    evolution = os.path.join(args.run_dir, analysis.LatentTracker.FILE)
    if os.path.isfile(evolution):
        with open(evolution) as handle:
            plots.latent_evolution(json.load(handle), os.path.join(out, "latent_evolution.png"))
        written.append("latent_evolution.png")
    print(f"fastvae analyze: wrote {', '.join(written)} to {out}")
    return 0


def _latent_3d(model, config, out: str) -> list[str]:
    """``latent_3d.png`` (means of up to 5,000 test images by class) and ``latent_slices.png``."""
    from fastvae import experiment_plots, experiments
    from fastvae.two_stage import decode_all

    try:
        test, labels = run_data(config, "test")
    except ValueError:  # a user file without a test split
        test, labels = run_data(config, "train")
    mu = experiments.encode_means(model, test[:5000])
    experiment_plots.latent_3d(mu, labels[:5000], os.path.join(out, "latent_3d.png"))
    levels = (-2.0, -1.0, 0.0, 1.0, 2.0)
    z = experiments.slice_latents(levels)
    images = decode_all(model, z.reshape(-1, 3)).reshape(len(levels), z.shape[1], *model.input_shape)
    experiment_plots.latent_slices(images, levels, os.path.join(out, "latent_slices.png"))
    return ["latent_3d.png", "latent_slices.png"]
