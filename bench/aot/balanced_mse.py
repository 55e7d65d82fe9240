"""The launches of ``fastvae.kernels.balanced_mse`` that CI compiles for every NVIDIA target: the training
path of each pass (batchmean loss with the min-ema update forward, the gradient of ``x_hat`` backward)."""
from __future__ import annotations

import torch

from fastvae.kernels._launch import accumulation_dtype
from fastvae.kernels.balanced_mse import backward, forward

from .harness import Spec, image_pair


def _aot_forward(x_hat, x):
    forward(x_hat, x, torch.ones((), dtype=torch.float32), "batchmean", False, "min-ema", 0.99)


def _aot_backward(x_hat, x):
    grad = torch.ones(1, dtype=accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype)))
    backward(grad, x_hat, x, torch.ones((), dtype=torch.float32), "batchmean", True, False)


AOT_SPECS = [
    Spec("balanced_mse", "forward", "batchmean loss, SSE and the min-ema update (LOSS_MODE=3, RULE=2)",
         image_pair, _aot_forward, traffic={"balanced_mse_fwd_kernel": (2, 0)}, memsets=1),
    Spec("balanced_mse", "backward", "grad x_hat only, batchmean (NEED_X_HAT)", image_pair, _aot_backward,
         traffic={"balanced_mse_bwd_kernel": (2, 1)}),
]
