"""``image_grid``: images ``(N, C, H, W)`` as one PNG grid: torchvision's ``make_grid`` where torchvision imports,
the same layout drawn with numpy otherwise; saved with PIL (no matplotlib in training).

``torchvision_status()`` says which: PyPI's torchvision wheels are CUDA builds that do not import beside a CPU
build of torch ("operator torchvision::nms does not exist"), and a message that said "not installed" then would send
the user to install what they have.
"""
from __future__ import annotations

import functools
import math

__all__ = ["image_grid", "torchvision_status"]


@functools.cache
def torchvision_status() -> tuple[object | None, str]:
    """``(torchvision, "torchvision VERSION")`` when it imports; else ``(None, why)``: ``"torchvision is not
    installed"``, or ``"torchvision VERSION is installed but does not import (ERROR) ..."`` with the error's first
    line."""
    import importlib.metadata

    try:
        import torchvision
        import torchvision.utils  # noqa: F401
    except Exception as error:  # noqa: BLE001 - an ImportError, or the RuntimeError of a wheel built for another torch
        if _find_spec("torchvision") is None:
            return None, "torchvision is not installed"
        try:
            version = importlib.metadata.version("torchvision")
        except importlib.metadata.PackageNotFoundError:
            version = "(version unknown)"
        import torch

        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return None, (f"torchvision {version} is installed but does not import ({type(error).__name__}: {reason}); "
                      f"it is likely built for another torch than this {torch.__version__}: install the torchvision "
                      "release that matches it")
    return torchvision, f"torchvision {torchvision.__version__}"


def _find_spec(name: str):
    import importlib.util

    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a broken entry in sys.modules
        return None


def image_grid(images, path, *, nrow=None, padding=2, pad_value=1.0, scale=None):
    """Write ``images`` ``(N, C, H, W)`` (C = 1 or 3, values in [0, 1]) as one PNG grid of ``nrow`` images a row
    (default: about square), ``padding`` pixels of ``pad_value`` between them, each pixel drawn ``scale`` x
    ``scale`` (default: enough for 32 pixels per image side). Returns ``path``."""
    import numpy as np
    import torch
    from PIL import Image

    x = images.detach().float().cpu() if hasattr(images, "detach") else torch.as_tensor(np.asarray(images, np.float32))
    x = x.clamp(0, 1)
    if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"image_grid: images must be (N, C, H, W) with C = 1 or 3 and N > 0, got shape "
                         f"{tuple(x.shape)}")
    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    torchvision, _ = torchvision_status()
    if torchvision is not None:
        grid = torchvision.utils.make_grid(x, nrow=nrow, padding=padding, pad_value=pad_value).numpy()
        grid = grid[:1] if c == 1 else grid  # make_grid repeats one channel three times
    else:
        rows = math.ceil(n / nrow)
        grid = np.full((c, padding + rows * (h + padding), padding + nrow * (w + padding)), pad_value, np.float32)
        for i in range(n):
            top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
            grid[:, top:top + h, left:left + w] = x[i].numpy()
    scale = scale or max(1, math.ceil(32 / max(h, w)))
    pixels = (grid * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)  # torchvision's save_image rounding
    image = Image.fromarray(np.ascontiguousarray(pixels[:, :, 0] if c == 1 else pixels))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path
