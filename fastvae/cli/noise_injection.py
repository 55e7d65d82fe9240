"""``fastvae noise-injection RUN``: the seed's sparsity-by-noise experiment and its reversal.

Loads the run's model, picks an active variable (``--variable``, default the active one with the smallest
reconstruction gain), trains on with Gaussian noise of growing std on its sample (one ``--increment`` per epoch)
while the inactive variables are held inactive, stops increasing when its gain falls below its KL, then removes
the noise and trains ``--recovery-epochs`` more. Writes ``RUN/noise_injection/history.csv`` (one row per epoch),
``noise_injection.png``, ``summary.json`` and ``model.pt`` (the model's final state_dict); the run's own
checkpoint is left untouched.
"""
from __future__ import annotations

import os

from ._common import check_minimum, load_run, output_path, run_data, seed_value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "noise-injection",
        help="make an active variable inactive by injecting noise, then remove it (the seed's experiment)",
        description="Train a run's model on with growing Gaussian noise on one active latent variable (inactive "
                    "variables held inactive) until its reconstruction gain falls below its KL, then without noise; "
                    "record per epoch the noise std, gain, KL, Var(mu), E[sigma^2] into "
                    "RUN/noise_injection/history.csv and a figure.")
    parser.add_argument("run_dir", metavar="RUN", help="a run folder written by fastvae train")
    parser.add_argument("--variable", type=int, default=None,
                        help="the variable to inject noise into (default: the active one with the smallest gain)")
    parser.add_argument("--increment", type=float, default=0.25, help="noise std added per epoch (default: 0.25)")
    parser.add_argument("--max-increments", type=int, default=12, help="most noise epochs (default: 12)")
    parser.add_argument("--recovery-epochs", type=int, default=5, help="epochs without noise afterwards (default: 5)")
    parser.add_argument("--limit", type=int, default=0, help="train on the first LIMIT images only (default: 0, all)")
    parser.add_argument("--stats-samples", type=int, default=2000,
                        help="images the per-epoch statistics are computed on (default: 2000)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the run's)")
    parser.add_argument("--seed", type=seed_value, default=0, help="seed of the batches and the noise (default: 0)")
    parser.add_argument("--device", default="cpu", help="device (default: cpu)")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/noise_injection)")
    parser.set_defaults(func=run, parser=parser)


def run(args) -> int:
    import torch

    from fastvae import experiment_plots, experiments
    from fastvae.analysis import latent_statistics

    parser = args.parser
    if not args.increment > 0:
        parser.error(f"--increment must be positive, got {args.increment}")
    check_minimum(parser, args, 1, "max_increments", "stats_samples")
    check_minimum(parser, args, 0, "recovery_epochs", "limit")
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    model, config = load_run(parser, args.run_dir, args.device)
    images, _ = run_data(config)
    if args.limit:
        images = images[:args.limit]
    stats_images = images[:args.stats_samples]
    stats = latent_statistics(model, stats_images)
    inactive = [j for j in range(stats.latent_dim) if bool(stats.inactive[j])]
    if args.variable is None:
        try:
            variable = experiments.smallest_gain_variable(stats)
        except ValueError as error:
            parser.error(str(error))
    else:
        variable = args.variable
        if not 0 <= variable < stats.latent_dim:
            parser.error(f"--variable must be in [0, {stats.latent_dim}), got {variable}")
        if variable in inactive:
            parser.error(f"--variable {variable} is already inactive (inactive: {inactive})")
    out = str(output_path("noise-injection", args))
    os.makedirs(out, exist_ok=True)
    print(f"fastvae noise-injection: variable {variable} (gain {float(stats.gain[variable]):.5f}, KL "
          f"{float(stats.kl[variable]):.3f}); holding inactive {inactive}")

    history = os.path.join(out, "history.csv")
    done = []

    def show(row):
        done.append(row)
        experiments.write_history(done, history)  # after every epoch, so that an interrupted run keeps its rows
        print(f"epoch {row.epoch:>3} {row.phase:<8} noise {row.noise_std:5.2f}  gain {row.gain_nats:8.3f} nats  "
              f"KL {row.kl:7.3f}  Var(mu) {row.var_mu:6.3f}  E[s^2] {row.mean_sigma2:6.3f}", flush=True)

    torch.manual_seed(args.seed)
    rows = experiments.noise_injection(
        model, images, variable=variable, held=inactive, increment=args.increment, max_increments=args.max_increments,
        recovery_epochs=args.recovery_epochs, batch_size=config.batch_size, lr=args.lr or config.lr,
        stats_images=stats_images, seed=args.seed, on_epoch=show)
    experiment_plots.noise_injection(rows, os.path.join(out, "noise_injection.png"), variable=variable)
    torch.save(model.state_dict(), os.path.join(out, "model.pt"))
    result = experiments.save_summary(rows, os.path.join(out, "summary.json"), run=os.path.abspath(args.run_dir),
                                      variable=variable, held=inactive, increment=args.increment)
    print(f"fastvae noise-injection: the gain {'fell' if result['gain_below_kl'] else 'did not fall'} below the KL "
          f"at noise std {result['stopped_at']['noise_std']:g}; after {result['recovery_epochs']} epoch(s) without "
          f"noise the variable is {'active' if result['active_at_end'] else 'inactive'} (Var(mu) "
          f"{result['end']['var_mu']:.3f}, E[sigma^2] {result['end']['mean_sigma2']:.3f})")
    print(f"fastvae noise-injection: wrote history.csv, noise_injection.png, summary.json, model.pt to {out}")
    return 0
