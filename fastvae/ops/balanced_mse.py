"""The balanced reconstruction loss (Asperti & Trentin 2020): ``balanced_mse`` and ``BalancedMSE``.

A Gaussian negative log-likelihood whose variance ``gamma^2`` is a running estimate of the MSE.
With ``update`` (the training default) the custom op ``fastvae::balanced_mse_update_`` computes the
loss and updates the running estimate in place in the same pass (``mutates_args``), and returns the
``gamma^2`` it used, which the backward reads: so the gradient uses the pre-update value under
torch.compile too. Without ``update``, and under torch.distributed (whose all-reduce of the batch MSE
runs between the pass and the update), the functional ``fastvae::balanced_mse`` returns the loss and
the sum of squared errors and the update runs after it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import backend, reference
from ..reference.balanced_mse import UPDATE_RULES
from . import _cpu, _eager
from ._checks import REDUCTIONS, check_choice, check_finite, check_float_tensor, check_running_estimate
from ._layout import as_rows, from_memory_order, memory_order, samples_in_memory_order

try:
    from ..kernels import balanced_mse as kernels_balanced_mse
except Exception as error:  # noqa: BLE001 - no Triton, or one the kernels cannot use: the CPU engine runs the op
    kernels_balanced_mse = backend.kernels_unavailable(error)


# ---------------------------------------------------------------------------------------- dispatch
def _rows(x: Tensor) -> Tensor:
    """``(N, *)`` as ``(N, prod(*))``."""
    return as_rows(x, x[0].numel() if x.dim() > 1 else 1)


def _pair_rows(x_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor, list[int] | None]:
    """``(x_hat, x)`` as ``(N, M)`` rows for the kernels, and the column order used. Every reduction
    sums over a sample's elements in any order, so when both share their strides (channels_last
    images) they are read in memory order, in place; else row-major (copied when no view exists)."""
    if x_hat.dim() > 2 and x_hat.stride() == x.stride():
        order = memory_order(x_hat)
        rows_hat, rows_x = samples_in_memory_order(x_hat, order), samples_in_memory_order(x, order)
        if rows_hat is not None and rows_x is not None:
            return rows_hat, rows_x, order
    return _rows(x_hat), _rows(x), None


def _unrows(flat: Tensor, like: Tensor, order: list[int] | None) -> Tensor:
    """A kernel's contiguous ``(N, M)`` result in ``like``'s shape (and memory format, with an ``order``)."""
    return from_memory_order(flat, like, order) if order is not None else flat.view(like.shape)


def _loss_shape(x: Tensor, reduction: str) -> torch.Size:
    if reduction == "none":
        return x.shape
    if reduction == "per_sample":
        return x.shape[:1]
    return torch.Size()


def _accumulation(x_hat: Tensor, x: Tensor) -> torch.dtype:
    return reference.accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype))


@torch.library.custom_op("fastvae::balanced_mse", mutates_args=())
def _balanced_mse_op(x_hat: Tensor, x: Tensor, gamma2: Tensor, reduction: str, full: bool) -> tuple[Tensor, Tensor]:
    """``(loss, sum((x_hat - x)^2))`` with variance ``gamma2``; the sum is not differentiable."""
    if backend.decide(x_hat) == "torch":
        return _cpu.balanced_mse_forward(x_hat, x, gamma2, reduction=reduction, full=full)
    rows_hat, rows_x, order = _pair_rows(x_hat, x)
    loss, sse, _ = kernels_balanced_mse.forward(rows_hat, rows_x, gamma2, reduction, full)
    loss = _unrows(loss, x_hat, order) if reduction == "none" else loss.view(_loss_shape(x_hat, reduction))
    return loss, sse.view(())


@torch.library.custom_op("fastvae::balanced_mse_update_", mutates_args=("running_mse",))
def _balanced_mse_update_op(
    x_hat: Tensor, x: Tensor, running_mse: Tensor, reduction: str, full: bool, momentum: float, rule: str
) -> tuple[Tensor, Tensor]:
    """``(loss, gamma2)``: the loss with ``gamma2`` = ``running_mse`` as it was (returned, one element,
    for the backward), then ``running_mse`` updated in place by ``rule``. On Triton, the kernel's last
    program does the update: no ATen op runs around the launch."""
    if backend.decide(x_hat) == "torch":
        gamma2 = running_mse.detach().clone()
        loss, sse = _cpu.balanced_mse_forward(x_hat, x, gamma2, reduction=reduction, full=full)
        _cpu.update_running_mse(running_mse, sse / x_hat.numel(), momentum=momentum, rule=rule)
        return loss, gamma2
    rows_hat, rows_x, order = _pair_rows(x_hat, x)
    loss, _, gamma2 = kernels_balanced_mse.forward(rows_hat, rows_x, running_mse, reduction, full, rule, momentum)
    loss = _unrows(loss, x_hat, order) if reduction == "none" else loss.view(_loss_shape(x_hat, reduction))
    return loss, gamma2.view(running_mse.shape)


@torch.library.custom_op("fastvae::balanced_mse_backward", mutates_args=())
def _balanced_mse_backward_op(
    grad: Tensor, x_hat: Tensor, x: Tensor, gamma2: Tensor, reduction: str, need_x_hat: bool, need_x: bool,
    backend_name: str,
) -> tuple[Tensor, Tensor]:
    """``(d/dx_hat, d/dx)`` on ``backend_name`` (its forward's); a gradient not needed comes back as an empty tensor."""
    if backend_name == "torch":
        grad_x_hat, grad_x = _cpu.balanced_mse_backward(grad, x_hat, x, gamma2, reduction, need_x=need_x)
    else:
        rows_hat, rows_x, order = _pair_rows(x_hat, x)
        if reduction != "none":
            grad_rows = grad.reshape(-1)
        elif order is not None:  # the upstream gradient's columns in the same order as the inputs'
            grad_rows = samples_in_memory_order(grad, order)
            grad_rows = grad_rows if grad_rows is not None else grad.permute(0, *order).reshape(grad.shape[0], -1)
        else:
            grad_rows = _rows(grad)
        grad_x_hat, grad_x = kernels_balanced_mse.backward(
            grad_rows, rows_hat, rows_x, gamma2, reduction, need_x_hat, need_x
        )
        grad_x_hat = _unrows(grad_x_hat, x_hat, order) if need_x_hat else grad_x_hat
        grad_x = _unrows(grad_x, x, order) if need_x else grad_x
    return (grad_x_hat if need_x_hat else x_hat.new_empty(0)), (grad_x if need_x else x.new_empty(0))


def _like_input(t: Tensor, x_hat: Tensor, x: Tensor) -> Tensor:
    """An empty tensor of ``t``'s shape and dtype in the memory format that the ops return for it."""
    order = _pair_rows(x_hat, x)[2]
    return _unrows(t.new_empty((t.shape[0], t[0].numel() if t.dim() > 1 else 1)), t, order)


def _fake_loss(x_hat: Tensor, x: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return _like_input(x_hat, x_hat, x)
    return x_hat.new_empty(_loss_shape(x_hat, reduction), dtype=_accumulation(x_hat, x))


@_balanced_mse_op.register_fake
def _(x_hat, x, gamma2, reduction, full):
    return _fake_loss(x_hat, x, reduction), x_hat.new_empty((), dtype=_accumulation(x_hat, x))


@_balanced_mse_update_op.register_fake
def _(x_hat, x, running_mse, reduction, full, momentum, rule):
    return _fake_loss(x_hat, x, reduction), running_mse.new_empty(running_mse.shape)


@_balanced_mse_backward_op.register_fake
def _(grad, x_hat, x, gamma2, reduction, need_x_hat, need_x, backend_name):
    return ((_like_input(x_hat, x_hat, x) if need_x_hat else x_hat.new_empty(0)),
            (_like_input(x, x_hat, x) if need_x else x.new_empty(0)))


def _setup(ctx, inputs, output):
    x_hat, x, gamma2, reduction, _ = inputs
    ctx.save_for_backward(x_hat, x, gamma2)
    ctx.reduction = reduction
    # setup_context runs right after the forward, under the same backend state: the forward's decision
    ctx.backend = backend.decide(x_hat)
    ctx.mark_non_differentiable(output[1])


def _grad(ctx, grad_loss, _grad_sse):
    x_hat, x, gamma2 = ctx.saved_tensors
    need_x_hat, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x_hat, grad_x = _balanced_mse_backward_op(grad_loss, x_hat, x, gamma2, ctx.reduction, need_x_hat, need_x,
                                                   ctx.backend)
    return (grad_x_hat if need_x_hat else None), (grad_x if need_x else None), None, None, None


_balanced_mse_op.register_autograd(_grad, setup_context=_setup)


class _BalancedMSEUpdate(torch.autograd.Function):
    """Autograd of ``fastvae::balanced_mse_update_`` (torch.library refuses a formula for a mutating op):
    the backward uses the ``gamma2`` that the op returned, the value before its update, in eager and
    under torch.compile alike."""

    @staticmethod
    def forward(ctx, x_hat, x, running_mse, reduction, full, momentum, rule, backend_name):
        loss, gamma2 = torch.ops.fastvae.balanced_mse_update_(x_hat, x, running_mse, reduction, full, momentum, rule)
        ctx.save_for_backward(x_hat, x, gamma2)
        ctx.reduction, ctx.backend = reduction, backend_name
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x_hat, x, gamma2 = ctx.saved_tensors
        need_x_hat, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x_hat, grad_x = _balanced_mse_backward_op(grad_loss, x_hat, x, gamma2, ctx.reduction, need_x_hat, need_x,
                                                       ctx.backend)
        return (grad_x_hat if need_x_hat else None), (grad_x if need_x else None), None, None, None, None, None, None


# ------------------------------------------------------------------------------------- public API

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def batch_mse(sse: Tensor, numel: int) -> Tensor:
    """``sse / numel``, summed over all ranks first when torch.distributed is initialized."""
    if _distributed():
        totals = torch.stack([sse.detach().double(),
                              torch.tensor(float(numel), dtype=torch.float64, device=sse.device)])
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
            ``batchmean`` (total / N) or ``sum``; reduced losses are float32 for half inputs.

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
    check_choice(op, "reduction", reduction, REDUCTIONS)
    check_choice(op, "rule", rule, UPDATE_RULES)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{op}: momentum must be in [0, 1], got {momentum}")
    check_finite(op, x_hat=x_hat, x=x, running_mse=running_mse)
    if update and not _distributed():
        # the update happens inside the op (the kernel's last program on Triton)
        return (_eager.route("balanced_mse_update_", x_hat, x) or _BalancedMSEUpdate.apply)(
            x_hat, x, running_mse, reduction, full, float(momentum), rule, backend.decide(x_hat))
    # the loss and its backward use gamma^2 as it was before this call's in-place update
    gamma2 = running_mse.detach().clone() if update else running_mse.detach()
    loss, sse = (_eager.route("balanced_mse", x_hat, x) or torch.ops.fastvae.balanced_mse)(
        x_hat, x, gamma2, reduction, full)
    if update:
        _cpu.update_running_mse(running_mse, batch_mse(sse, x_hat.numel()), momentum=momentum, rule=rule)
    return loss


class BalancedMSE(nn.Module):
    """``balanced_mse`` as a module: ``running_mse`` is a buffer (saved in the state_dict and in
    checkpoints, start value ``init``), updated only in training mode. ``gamma = sqrt(running_mse)``."""

    def __init__(self, momentum: float = 0.99, rule: str = "min-ema", reduction: str = "batchmean", full: bool = False,
                 init: float = 1.0):
        super().__init__()
        check_choice("BalancedMSE", "rule", rule, UPDATE_RULES)
        check_choice("BalancedMSE", "reduction", reduction, REDUCTIONS)
        if not init > 0:
            raise ValueError(f"BalancedMSE: init must be positive, got {init}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BalancedMSE: momentum must be a number in [0, 1], got {momentum!r}")
        self.momentum, self.rule, self.reduction, self.full = momentum, rule, reduction, full
        self.register_buffer("running_mse", torch.tensor(float(init)))

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
