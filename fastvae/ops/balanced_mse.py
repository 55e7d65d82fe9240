"""The balanced reconstruction loss (Asperti & Trentin 2020): ``balanced_mse`` and ``BalancedMSE``.

A Gaussian negative log-likelihood whose variance ``gamma^2`` is a running estimate of the MSE.
With ``update`` (the training default) the op ``fastvae::balanced_mse_update_`` computes the loss and
updates the running estimate in place in the same pass (``mutates``), and returns the ``gamma^2`` it
used, which the backward reads: so the gradient uses the pre-update value under torch.compile too.
Without ``update``, and under torch.distributed (whose all-reduce of the batch MSE runs between the pass
and the update), the functional ``fastvae::balanced_mse`` returns the loss and the sum of squared errors
and the update runs after it. Both declare the same backward (``_engine_backward``, ``_kernel_backward``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import backend, reference
from ..reference.balanced_mse import UPDATE_RULES
from . import engine
from ..reference.reduce import MEAN
from ._checks import (
    REDUCTIONS, check_choice, check_finite, check_float_tensor, check_running_estimate, vouch_running_estimate,
)
from ._layout import pair_rows, sample_rows, samples_in_memory_order, unrows
from ._op import Op

try:
    from ..kernels import balanced_mse as kernels_balanced_mse
except Exception as error:  # noqa: BLE001 - no Triton, or one the kernels cannot use: the engine runs the op
    kernels_balanced_mse = backend.kernels_unavailable(error)

__all__ = ["balanced_mse", "BalancedMSE"]


# ----------------------------------------------------------------------------------- declarations
def _loss_shape(x: Tensor, reduction: str) -> torch.Size:
    if reduction == "none":
        return x.shape
    if reduction == "per_sample":
        return x.shape[:1]
    return torch.Size()


def _accumulation(x_hat: Tensor, x: Tensor) -> torch.dtype:
    return reference.accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype))


def _engine(x_hat: Tensor, x: Tensor, gamma2: Tensor, reduction: str, full: bool) -> tuple[Tensor, Tensor]:
    """``(loss, sum((x_hat - x)^2))`` with variance ``gamma2``; the sum is not differentiable."""
    return engine.balanced_mse_forward(x_hat, x, gamma2, reduction=reduction, full=full)


def _kernel(x_hat, x, gamma2, reduction, full):
    rows_hat, rows_x, order = pair_rows(x_hat, x)
    loss, sse, _ = kernels_balanced_mse.forward(rows_hat, rows_x, gamma2, reduction, full)
    loss = unrows(loss, x_hat, order) if reduction == "none" else loss.view(_loss_shape(x_hat, reduction))
    return loss, sse.view(())


def _engine_update(x_hat: Tensor, x: Tensor, running_mse: Tensor, reduction: str, full: bool, momentum: float,
                   rule: str) -> tuple[Tensor, Tensor]:
    """``(loss, gamma2)``: the loss with ``gamma2`` = ``running_mse`` as it was (returned, one element,
    for the backward), then ``running_mse`` updated in place by ``rule``."""
    gamma2 = running_mse.detach().clone()
    loss, sse = engine.balanced_mse_forward(x_hat, x, gamma2, reduction=reduction, full=full)
    engine.update_running_mse(running_mse, sse / x_hat.numel(), momentum=momentum, rule=rule)
    return loss, gamma2


def _kernel_update(x_hat, x, running_mse, reduction, full, momentum, rule):
    """The kernel's last program does the update: no ATen op runs around the launch."""
    rows_hat, rows_x, order = pair_rows(x_hat, x)
    loss, _, gamma2 = kernels_balanced_mse.forward(rows_hat, rows_x, running_mse, reduction, full, rule, momentum)
    loss = unrows(loss, x_hat, order) if reduction == "none" else loss.view(_loss_shape(x_hat, reduction))
    return loss, gamma2.view(running_mse.shape)


def _like_input(t: Tensor, x_hat: Tensor, x: Tensor) -> Tensor:
    """An empty tensor of ``t``'s shape and dtype in the memory format that the ops return for it."""
    order = pair_rows(x_hat, x)[2]
    return unrows(t.new_empty((t.shape[0], t[0].numel() if t.dim() > 1 else 1)), t, order)


def _fake_loss(x_hat: Tensor, x: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return _like_input(x_hat, x_hat, x)
    return x_hat.new_empty(_loss_shape(x_hat, reduction), dtype=_accumulation(x_hat, x))


def _fake(x_hat, x, gamma2, reduction, full):
    return _fake_loss(x_hat, x, reduction), x_hat.new_empty((), dtype=_accumulation(x_hat, x))


def _fake_update(x_hat, x, running_mse, reduction, full, momentum, rule):
    return _fake_loss(x_hat, x, reduction), running_mse.new_empty(running_mse.shape)


def _engine_backward(grad, _grad_stat, x_hat, x, gamma2, reduction, *params_and_needs):
    """``d/dx_hat = g (x_hat - x) / gamma^2``, ``d/dx = -d/dx_hat`` (``gamma2``: the variance the forward used)."""
    need_x = params_and_needs[-1][1]
    return engine.balanced_mse_backward(grad, x_hat, x, gamma2, reduction, need_x=need_x)


def _kernel_backward(grad, _grad_stat, x_hat, x, gamma2, reduction, *params_and_needs):
    need_x_hat, need_x = params_and_needs[-1]
    rows_hat, rows_x, order = pair_rows(x_hat, x)
    if reduction != "none":
        grad_rows = grad.reshape(-1)
    elif order is not None:  # the upstream gradient's columns in the same order as the inputs'
        grad_rows = samples_in_memory_order(grad, order)
        grad_rows = grad_rows if grad_rows is not None else grad.permute(0, *order).reshape(grad.shape[0], -1)
    else:
        grad_rows = sample_rows(grad)
    grad_x_hat, grad_x = kernels_balanced_mse.backward(grad_rows, rows_hat, rows_x, gamma2, reduction, need_x_hat,
                                                       need_x)
    return (unrows(grad_x_hat, x_hat, order) if need_x_hat else None), (unrows(grad_x, x, order) if need_x else None)


def _backward_fake(grad, _grad_stat, x_hat, x, gamma2, reduction, *params_and_needs):
    return _like_input(x_hat, x_hat, x), _like_input(x, x_hat, x)


def _examples(n: int, d: int, device: torch.device) -> list[tuple]:
    x_hat = torch.rand(n, 1, 3, d, device=device).requires_grad_()
    x = torch.rand(n, 1, 3, d, device=device)
    cl_hat = torch.rand(n, 3, 2, d, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    cl = torch.rand(n, 3, 2, d, device=device).contiguous(memory_format=torch.channels_last)
    gamma2 = torch.full((), 0.3, device=device)
    return [(x_hat, x, gamma2, "batchmean", True), (x_hat, x.clone().requires_grad_(), gamma2, "none", False),
            (cl_hat, cl, gamma2, "per_sample", True)]


def _examples_update(n: int, d: int, device: torch.device) -> list[tuple]:
    return [(x_hat, x, torch.full((), 0.3, device=device), reduction, full, momentum, rule)
            for (x_hat, x, _, reduction, full), momentum, rule in zip(_examples(n, d, device), (0.7, 0.95, 0.5),
                                                                       UPDATE_RULES + ("ema",))]


_BACKWARD = dict(saves=("x_hat", "x", "gamma2"), differentiable=("x_hat", "x"), engine_backward=_engine_backward,
                 kernel_backward=_kernel_backward, backward_fake=_backward_fake)
BALANCED_MSE = Op("balanced_mse", _engine, _fake, kernel=_kernel, outputs=("loss", "sse"), non_differentiable=("sse",),
                  examples=_examples, bench=("bench.cases.balanced_mse",), aot="bench.aot.balanced_mse", **_BACKWARD)
"""``(loss, sse)``; the sum of squared errors is not differentiable."""
BALANCED_MSE_UPDATE = Op("balanced_mse_update_", _engine_update, _fake_update, kernel=_kernel_update,
                         outputs=("loss", "gamma2"), non_differentiable=("gamma2",), mutates=("running_mse",),
                         examples=_examples_update, aot="bench.aot.balanced_mse", **_BACKWARD)
"""``(loss, gamma2)``, ``running_mse`` updated in place; the backward reads the returned ``gamma2`` (an output
here, an input of ``balanced_mse``: the same formula)."""


# ------------------------------------------------------------------------------------- public API
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def batch_mse(sse: Tensor, numel: int) -> Tensor:
    """``sse / numel``, summed over all ranks first when torch.distributed is initialized."""
    if _distributed():
        # the count is filled on the device: no host-to-device copy (a stream sync, illegal in a CUDA graph)
        totals = torch.stack([sse.detach().double(), torch.full((), numel, dtype=torch.float64, device=sse.device)])
        dist.all_reduce(totals)
        return (totals[0] / totals[1]).to(sse.dtype)
    return sse.detach() / numel


def balanced_mse(
    x_hat: Tensor,
    x: Tensor,
    running_mse: Tensor,
    *,
    momentum: float = 0.99,
    rule: str = "min-ema",
    update: bool = True,
    reduction: str = "batchmean",
    full: bool = False,
) -> Tensor:
    r"""The balanced reconstruction loss: a Gaussian NLL whose variance is a running estimate of the MSE.

    .. math::
        \ell = \frac{(\hat x - x)^2}{2\gamma^2} + \frac{\log \gamma^2}{2} \;\Big(+ \frac{\log 2\pi}{2}
        \text{ when full}\Big), \qquad \gamma^2 = \texttt{running\_mse}

    It equals ``nn.GaussianNLLLoss(full=full, reduction="sum")(x_hat, x, gamma^2)`` divided by the
    batch size for ``batchmean``. No gradient flows through ``gamma^2``.

    Args:
        x_hat, x: ``(N, *)``, same shape and device, floating (they may differ in dtype, as under autocast).
        running_mse: one-element floating tensor (> 0) on the same device: ``gamma^2``. When ``update``,
            it is updated in place after the forward from ``batch_mse = mean((x_hat - x)^2)`` (over all
            ranks under torch.distributed): ``min-ema``: ``r = min(r, m r + (1 - m) batch_mse)``;
            ``ema``: ``r = m r + (1 - m) batch_mse``, with ``m = momentum``.
        reduction: ``none`` (shape of x), ``per_sample`` (sum over all but dim 0: ``(N,)``),
            ``batchmean`` (total / N), ``sum``, or torch's ``mean`` (total / ``x.numel()``, as
            ``GaussianNLLLoss(reduction="mean")``); reduced losses are float32 for half inputs.

    Example::

        >>> running_mse = torch.ones(())
        >>> loss = fastvae.balanced_mse(decoder(z), x, running_mse)   # running_mse now updated
    """
    op = "balanced_mse"
    check_float_tensor(op, "x_hat", x_hat)
    check_float_tensor(op, "x", x)
    if x_hat.shape != x.shape:
        raise ValueError(f"{op}: x_hat and x must have the same shape, got {tuple(x_hat.shape)} and {tuple(x.shape)}")
    if x_hat.device != x.device:
        raise ValueError(f"{op}: x_hat and x must be on the same device, got {x_hat.device} and {x.device}")
    check_running_estimate(op, "running_mse", running_mse, x_hat.device)
    check_choice(op, "reduction", reduction, REDUCTIONS + (MEAN,))
    check_choice(op, "rule", rule, UPDATE_RULES)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{op}: momentum must be in [0, 1], got {momentum}")
    check_finite(op, x_hat=x_hat, x=x, running_mse=running_mse)
    if reduction == MEAN:
        return balanced_mse(x_hat, x, running_mse, momentum=momentum, rule=rule, update=update, reduction="sum",
                            full=full) / x_hat.numel()
    if update and not _distributed():
        # the update happens inside the op (the kernel's last program on Triton)
        loss = BALANCED_MSE_UPDATE(x_hat, x, running_mse, reduction, full, float(momentum), rule)[0]
        if momentum > 0:
            vouch_running_estimate(running_mse)
        return loss
    # the loss and its backward use gamma^2 as it was before this call's in-place update
    gamma2 = running_mse.detach().clone() if update else running_mse.detach()
    loss, sse = BALANCED_MSE(x_hat, x, gamma2, reduction, full)
    if update:
        engine.update_running_mse(running_mse, batch_mse(sse, x_hat.numel()), momentum=momentum, rule=rule)
        if momentum > 0:
            vouch_running_estimate(running_mse)
    return loss


class BalancedMSE(nn.Module):
    """``balanced_mse`` as a module: ``running_mse`` is a buffer (saved in the state_dict and in
    checkpoints, start value ``init``), updated only in training mode. ``gamma = sqrt(running_mse)``."""

    def __init__(self, momentum: float = 0.99, rule: str = "min-ema", reduction: str = "batchmean", full: bool = False,
                 init: float = 1.0):
        super().__init__()
        check_choice("BalancedMSE", "rule", rule, UPDATE_RULES)
        check_choice("BalancedMSE", "reduction", reduction, REDUCTIONS + (MEAN,))
        if not init > 0:
            raise ValueError(f"BalancedMSE: init must be positive, got {init}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BalancedMSE: momentum must be a number in [0, 1], got {momentum!r}")
        self.momentum, self.rule, self.reduction, self.full = momentum, rule, reduction, full
        self.register_buffer("running_mse", torch.tensor(float(init)))
        vouch_running_estimate(self.running_mse)

    @property
    def gamma(self) -> Tensor:
        return self.running_mse.sqrt()

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        return balanced_mse(
            x_hat, x, self.running_mse, momentum=self.momentum, rule=self.rule,
            update=self.training, reduction=self.reduction, full=self.full,
        )

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, rule={self.rule!r}, reduction={self.reduction!r}, full={self.full}"
