"""``python -m bench.examples_vae``: pytorch/examples' VAE script (``examples/vae/main.py``) on Fashion-MNIST, as a
whole process: what a user who copies that example runs, the yardstick of ``fastvae train``'s start-up and epochs.

    python -m bench.examples_vae [--epochs 3] [--out FOLDER] [--data-root /usr/share/datasets/fashion-mnist]

Like the example: ``torchvision.datasets.FashionMNIST(transform=ToTensor())`` in a ``DataLoader`` (batch 128,
shuffled), Adam lr 1e-3, ``loss.item()`` read at every step, after each epoch the test split evaluated and a
reconstruction grid and a grid of 64 samples written as PNGs. Unlike it, the model is fastvae's default dense one
(784-256-64-32-16, ReLU, sigmoid output) so that both do the same arithmetic, and the loss is the example's
(binary cross-entropy summed + KL). torchvision cannot be installed beside this CPU build of torch, so
``TorchvisionFashionMNIST`` reproduces its dataset: the IDX files read once, then per item a PIL image and
``to_tensor``. This module imports torch, numpy and PIL only, never fastvae, so its start-up is the example's.
"""
from __future__ import annotations

import argparse
import gzip
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

DEBIAN_FOLDER = "/usr/share/datasets/fashion-mnist"
BATCH, LR, LATENT, HIDDEN = 128, 1e-3, 16, (256, 64, 32)


# --------------------------------------------------------------------------------------------------
# torchvision's FashionMNIST and ToTensor, reproduced
# --------------------------------------------------------------------------------------------------
def to_tensor(pic) -> Tensor:
    """torchvision.transforms.functional.to_tensor for a PIL image: ``(C, H, W)`` float in [0, 1]."""
    img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
    img = img.view(pic.size[1], pic.size[0], len(pic.getbands()))
    img = img.permute((2, 0, 1)).contiguous()
    return img.to(dtype=torch.get_default_dtype()).div(255)


class TorchvisionFashionMNIST(Dataset):
    """``torchvision.datasets.FashionMNIST(root, train=True, transform=ToTensor())`` without torchvision:
    ``data`` uint8 ``(N, 28, 28)``, ``targets`` int64 ``(N,)``; ``__getitem__`` returns ``(image, target)``
    with the image made by ``PIL.Image.fromarray(data[i].numpy(), mode "L")`` and ``to_tensor``."""

    def __init__(self, data: Tensor, targets: Tensor, transform: Callable | None = to_tensor):
        if data.dtype != torch.uint8 or data.dim() != 3:
            raise ValueError(f"data must be uint8 (N, H, W), got {data.dtype} of shape {tuple(data.shape)}")
        self.data, self.targets, self.transform = data, targets, transform

    @classmethod
    def from_folder(cls, folder: str | Path, train: bool = True) -> TorchvisionFashionMNIST:
        """The split of the IDX files in ``folder`` (``.gz`` or raw), read as torchvision reads its raw files."""
        prefix = "train" if train else "t10k"
        return cls(torch.from_numpy(_read_idx(folder, f"{prefix}-images-idx3-ubyte")),
                   torch.from_numpy(_read_idx(folder, f"{prefix}-labels-idx1-ubyte")).long())

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        from PIL import Image

        img, target = self.data[index], int(self.targets[index])
        img = Image.fromarray(img.numpy())  # a 2-D uint8 array is mode "L"
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def _read_idx(folder: str | Path, stem: str) -> np.ndarray:
    path = Path(folder) / stem
    raw = path.read_bytes() if path.is_file() else gzip.open(f"{path}.gz", "rb").read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


# --------------------------------------------------------------------------------------------------
# The example's model, loss and loop
# --------------------------------------------------------------------------------------------------
def _mlp(sizes) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return layers[:-1]


class VAE(nn.Module):
    """The example's VAE with fastvae's default dense sizes: 784-256-64-32-(2 x 16) and back, sigmoid output."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), *_mlp((784, *HIDDEN, 2 * LATENT)))
        self.decoder = nn.Sequential(*_mlp((LATENT, *HIDDEN[::-1], 784)), nn.Sigmoid())

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def loss_function(recon_x: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """The example's loss: binary cross-entropy summed over pixels and batch, plus the KL to N(0, I)."""
    bce = nn.functional.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def save_grid(images: Tensor, path: Path, nrow: int = 8) -> None:
    """``torchvision.utils.save_image(images, path, nrow)`` for ``(N, 1, 28, 28)`` images, 2-pixel padding."""
    from PIL import Image

    n, pad = images.shape[0], 2
    rows = (n + nrow - 1) // nrow
    grid = torch.zeros(rows * (28 + pad) + pad, nrow * (28 + pad) + pad)
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[pad + r * (28 + pad):pad + r * (28 + pad) + 28, pad + c * (28 + pad):pad + c * (28 + pad) + 28] = \
            images[k, 0]
    Image.fromarray(grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.examples_vae", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=None, help="where the grids go (default: a temporary folder)")
    parser.add_argument("--data-root", default=os.environ.get("FASHION_MNIST", DEBIAN_FOLDER))
    args = parser.parse_args(argv)
    torch.manual_seed(1)
    started = time.perf_counter()
    train_loader = DataLoader(TorchvisionFashionMNIST.from_folder(args.data_root, train=True),
                              batch_size=BATCH, shuffle=True)
    test_loader = DataLoader(TorchvisionFashionMNIST.from_folder(args.data_root, train=False),
                             batch_size=BATCH, shuffle=False)
    model = VAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        for epoch in range(1, args.epochs + 1):
            model.train()
            train_loss = 0.0
            for data, _ in train_loader:
                optimizer.zero_grad()
                recon, mu, logvar = model(data)
                loss = loss_function(recon, data, mu, logvar)
                loss.backward()
                train_loss += loss.item()
                optimizer.step()
            model.eval()
            test_loss = 0.0
            with torch.no_grad():
                for i, (data, _) in enumerate(test_loader):
                    recon, mu, logvar = model(data)
                    test_loss += loss_function(recon, data, mu, logvar).item()
                    if i == 0:
                        pairs = torch.cat([data[:8], recon.view(-1, 1, 28, 28)[:8]])
                        save_grid(pairs, out / f"reconstruction_{epoch}.png")
                save_grid(model.decode(torch.randn(64, LATENT)).view(64, 1, 28, 28), out / f"sample_{epoch}.png")
            print(f"epoch {epoch}: train loss {train_loss / len(train_loader.dataset):.4f}, test loss "
                  f"{test_loss / len(test_loader.dataset):.4f}, {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
