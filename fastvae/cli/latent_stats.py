"""``fastvae latent-stats MODEL``: per-channel mean/std and the scaling factor of an autoencoder's latents.

MODEL is a diffusers autoencoder saved with ``save_pretrained`` (a folder with ``config.json`` naming its
``_class_name``, such as ``AutoencoderKL``) or a fastvae run folder. The latents of the dataset are streamed
batch by batch; the table goes to stdout and, with ``--out``, the numbers to a JSON file.
"""
from __future__ import annotations

import json
import os

from ._common import seed_value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "latent-stats", help="per-channel latent mean/std and the scaling factor of a trained autoencoder",
        description="Encode a dataset batch by batch with a trained autoencoder and report the per-channel mean "
                    "and std of its latents, their global mean and std, and the scaling factor 1 / std (LDM's "
                    "scale_factor, diffusers' vae.config.scaling_factor) with the shift factor (their mean).")
    parser.add_argument("model", metavar="MODEL",
                        help="a diffusers autoencoder folder (save_pretrained) or a fastvae run folder")
    parser.add_argument("--data", default=None,
                        help="dataset name or .npy/.npz file of images "
                             "(default: the run's dataset; required for diffusers)")
    parser.add_argument("--data-root", default=None, help="the data folder (default: $FASTVAE_DATA or ./data)")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="data split (default: train)")
    parser.add_argument("--limit", type=int, default=0, help="use the first LIMIT images only (default: 0, all)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    parser.add_argument("--size", type=int, default=0,
                        help="resize images to SIZE x SIZE first (default: 0, as they are)")
    parser.add_argument("--posterior", choices=("sample", "mode"), default="sample",
                        help="latents drawn from the posterior (LDM, diffusers' scripts) or its mode (default: sample)")
    parser.add_argument("--seed", type=seed_value, default=0, help="seed of the posterior samples (default: 0)")
    parser.add_argument("--correction", type=int, default=1,
                        help="std divides by n - correction (default: 1, as torch.std)")
    parser.add_argument("--device", default="cpu", help="device to run the model on (default: cpu)")
    parser.add_argument("--out", default=None, help="write the numbers to this JSON file")
    parser.set_defaults(func=run, parser=parser)


def _is_diffusers_folder(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as handle:
        return "_class_name" in json.load(handle)


def _diffusers_model(path: str, device: str):
    import diffusers

    with open(os.path.join(path, "config.json")) as handle:
        class_name = json.load(handle)["_class_name"]
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "encode"):
        raise ValueError(f"{path}: {class_name} is not a diffusers autoencoder class")
    return cls.from_pretrained(path).to(device).eval()


def _batches(images, batch_size: int, size: int, low: float, channels: int):
    import torch.nn.functional as F

    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        if x.shape[1] != channels:
            if x.shape[1] == 1:
                x = x.expand(-1, channels, -1, -1)
            else:
                raise ValueError(f"the images have {x.shape[1]} channels and the model expects {channels}")
        if size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        yield x * (1.0 - low) + low  # [0, 1] to [low, 1]


def run(args) -> int:
    import torch

    from fastvae import latent_stats
    from fastvae.data import load_dataset

    parser = args.parser
    for name in ("limit", "size", "correction"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    if not os.path.isdir(args.model):
        parser.error(f"{args.model} is not a folder (a diffusers save_pretrained folder or a fastvae run folder)")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    try:
        if _is_diffusers_folder(args.model):
            if args.data is None:
                parser.error("--data is required for a diffusers model")
            vae = _diffusers_model(args.model, args.device)
            encode = latent_stats.diffusers_encoder(vae, args.posterior, generator)
            channels, low = vae.config.in_channels, -1.0
            data, root, kind = args.data, args.data_root, type(vae).__name__
        else:
            import fastvae

            model, config = fastvae.load(args.model, device=args.device)

            def encode(x):
                mu, logvar = model.encode(x.to(args.device))
                if args.posterior == "mode":
                    return mu
                seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
                return fastvae.reparameterize(mu, logvar, seed=seed)

            channels, low = model.input_shape[0] if hasattr(model, "input_shape") else 1, 0.0
            data, root = args.data or config.dataset, args.data_root or config.data_root
            kind = f"fastvae {config.model} VAE"
        images, _ = load_dataset(data, root, args.split, download=False)
        if args.limit:
            images = images[:args.limit]
        stats = latent_stats.latent_channel_stats(
            encode, _batches(images, args.batch_size, args.size, low, channels), correction=args.correction)
    except (FileNotFoundError, ValueError, ImportError, OSError, RuntimeError) as error:
        parser.error(str(error).splitlines()[0] if str(error) else repr(error))
    print(f"fastvae latent-stats: {kind}, {stats.num_latents} images of {data} ({args.split}), "
          f"{args.posterior} of the posterior, latents of {len(stats.mean)} channels")
    print(stats.table())
    if args.out:
        report = {"model": os.path.abspath(args.model), "data": str(data), "split": args.split,
                  "posterior": args.posterior, "seed": args.seed, **stats.to_dict()}
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        print(f"written: {args.out}")
    return 0
