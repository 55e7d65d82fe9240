"""``image_grid``: images ``(N, C, H, W)`` as one PNG grid, drawn with PIL (no matplotlib in training).

torchvision's ``make_grid``/``save_image`` would do, but PyPI's torchvision wheel for torch 2.13 does not import
beside the CPU build of torch ("operator torchvision::nms does not exist"), so the grid is drawn here.
"""
from __future__ import annotations

import math

__all__ = ["image_grid"]


def image_grid(images, path, *, nrow=None, padding=2, pad_value=1.0, scale=None):
    """Write ``images`` ``(N, C, H, W)`` (C = 1 or 3, values in [0, 1]) as one PNG grid of ``nrow`` images a row
    (default: about square), ``padding`` pixels of ``pad_value`` between them, each pixel drawn ``scale`` x
    ``scale`` (default: enough for 32 pixels per image side). Returns ``path``."""
    import numpy as np
    from PIL import Image

    if hasattr(images, "detach"):
        x = images.detach().float().cpu().clamp(0, 1).numpy()
    else:
        x = np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"image_grid: images must be (N, C, H, W) with C = 1 or 3 and N > 0, got shape {x.shape}")
    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((c, padding + rows * (h + padding), padding + nrow * (w + padding)), pad_value, dtype=np.float32)
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    scale = scale or max(1, math.ceil(32 / max(h, w)))
    pixels = (grid * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    image = Image.fromarray(np.ascontiguousarray(pixels[:, :, 0] if c == 1 else pixels))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path
