"""``fastvae fid RUN`` and ``fastvae fid-features --dataset NAME``.

``fid`` reports the Frechet distance to the test set of: real training images (the floor of the measure),
reconstructions of test images, first-stage samples, and, when ``fastvae two-stage RUN`` has trained a second
stage, second-stage samples with each renormalization (none, per_dim, scalar), and, when ``fastvae two-stage RUN
--latents active`` has trained one, the second stage of the active variables (with and without
renormalization, inactive variables filled with noise, and with zeros). It writes ``RUN/fid.json``
and always names the feature extractor. ``fid-features`` trains and caches the small classifier whose
features are used when Inception's weights are not on the machine.
"""
from __future__ import annotations

import json
import os

from ._common import check_minimum, load_run, output_path, run_data, seed_value


def register(subparsers) -> None:
    from fastvae.fid import EXTRACTORS

    parser = subparsers.add_parser(
        "fid", help="FID of reconstructions, first- and second-stage samples of a run against the test set",
        description="Frechet distance between features of generated images and of the test set, for reconstructions, "
                    "first-stage samples and second-stage samples with each renormalization mode. Features: "
                    "Inception-v3 pool3 when pytorch-fid and its weights are on this machine (never downloaded), "
                    "else a small classifier trained on the dataset and cached (see fastvae fid-features).")
    parser.add_argument("run_dir", metavar="RUN", help="a run folder written by fastvae train")
    parser.add_argument("--n", type=int, default=10000, help="images per setting (default: 10000)")
    parser.add_argument("--extractor", choices=EXTRACTORS, default="auto",
                        help="feature extractor (default: auto, Inception when available, else the classifier)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the classifier is cached (default: $FASTVAE_CACHE_DIR or ~/.cache/fastvae)")
    parser.add_argument("--classifier-epochs", type=int, default=3,
                        help="epochs of the classifier when it must be trained first (default: 3)")
    parser.add_argument("--seed", type=seed_value, default=0, help="seed of the generated samples (default: 0)")
    parser.add_argument("--device", default="cpu", help="device (default: cpu)")
    parser.add_argument("--out", default=None, help="JSON report path (default: RUN/fid.json)")
    parser.set_defaults(func=run, parser=parser)

    features = subparsers.add_parser(
        "fid-features", help="train and cache the classifier whose features fastvae fid uses without Inception",
        description="Train the small CNN of fastvae.fid on a dataset's training split, test it, and cache it.")
    features.add_argument("--dataset", required=True, help="dataset name (as for fastvae train) or .npz path")
    features.add_argument("--data-root", default=None, help="data folder (default: $FASTVAE_DATA or ./data)")
    features.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    features.add_argument("--cache-dir", default=None,
                          help="cache folder (default: $FASTVAE_CACHE_DIR or ~/.cache/fastvae)")
    features.add_argument("--force", action="store_true", help="retrain even when a cached classifier exists")
    features.add_argument("--device", default="cpu", help="device (default: cpu)")
    features.set_defaults(func=run_features, parser=features)


def run_features(args) -> int:
    from fastvae import fid
    from fastvae.data import resolve_dataset

    if args.epochs < 1:
        args.parser.error(f"--epochs must be positive, got {args.epochs}")
    dataset = resolve_dataset(args.dataset, args.data_root)
    path = fid.fit_classifier_features(dataset, root=args.cache_dir, data_root=args.data_root, epochs=args.epochs,
                                       force=args.force, device=args.device)
    print(fid.load_classifier_extractor(path).name)
    return 0


def run(args) -> int:
    from fastvae import fid, two_stage
    from fastvae.analysis import encode_all

    parser = args.parser
    if args.n < 2:
        parser.error(f"--n must be at least 2, got {args.n}")
    check_minimum(parser, args, 1, "classifier_epochs")
    first, config = load_run(parser, args.run_dir, args.device)
    if len(first.input_shape) != 3:
        parser.error(f"the run's model makes vectors of shape {first.input_shape}, not images; FID needs images")
    try:
        extractor = fid.get_extractor(config.dataset, args.extractor, root=args.cache_dir, device=args.device,
                                      data_root=config.data_root, epochs=args.classifier_epochs)
    except (RuntimeError, FileNotFoundError) as error:
        parser.error(str(error))
    train, _ = run_data(config, "train")
    test, _ = run_data(config, "test")
    print(f"fastvae fid: features: {extractor.name}")
    if extractor.metric != "FID":
        print(f"fastvae fid: {extractor.metric}: a Frechet distance on these features, comparable with other "
              "classifier-FIDs of the same network, not with published (Inception) FIDs")
    print(f"fastvae fid: reference: {test.shape[0]} test images of {config.dataset}")
    reference = extractor(test)

    second = two_stage.load_second_stage(args.run_dir, device=args.device)
    candidates = {"real training images": train[:args.n]}
    mu, _ = encode_all(first, test[:args.n])
    candidates["reconstructions (test)"] = two_stage.decode_all(first, mu)
    target = two_stage.aggregate_posterior(first, train) if second is not None else None
    active = two_stage.load_active_second_stage(args.run_dir, device=args.device)
    if active is not None and target is None:
        target = two_stage.aggregate_posterior(first, train)
    for name, z in two_stage.setting_latents(first, second, args.n, target, seed=args.seed).items():
        candidates[name] = two_stage.decode_all(first, z)
    if active is not None:
        second_active, variables = active
        print(f"fastvae fid: active second stage on variables {variables}")
        for name, z in two_stage.active_setting_latents(first, second_active, variables, args.n, target,
                                                        seed=args.seed).items():
            candidates[name] = two_stage.decode_all(first, z)

    rows = {}
    for name, images in candidates.items():
        rows[name] = {"n": images.shape[0], "fid": fid.fid_from_features(extractor(images), reference)}
    width = max(map(len, rows)) + 2
    print(f"{'setting':<{width}} {'n':>6} {extractor.metric:>14}")
    for name, row in rows.items():
        print(f"{name:<{width}} {row['n']:>6} {row['fid']:14.3f}")
    if second is None:
        print(f"(no second stage in {os.path.join(args.run_dir, two_stage.SUBDIR)}: run `fastvae two-stage "
              f"{args.run_dir}` "
              "for the second-stage settings)")
    if active is None:
        print("(no second stage of the active variables: run "
              f"`fastvae two-stage {args.run_dir} --latents active` for those)")
    from fastvae.train.runfolder import provenance

    out = str(output_path("fid", args))
    with open(out, "w") as handle:
        json.dump({"run": os.path.abspath(args.run_dir), "source": provenance(args.run_dir),
                   "extractor": extractor.name, "metric": extractor.metric, "dataset": config.dataset,
                   "reference": f"test split, {test.shape[0]} images", "seed": args.seed,
                   "active_variables": None if active is None else active[1], "settings": rows}, handle, indent=2)
        handle.write("\n")
    print(f"fastvae fid: wrote {out}")
    return 0
