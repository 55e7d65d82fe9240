"""The eager fast path: the CPU engine behind lean ``torch.autograd.Function``s instead of the custom ops.

A custom op costs ~125 us per forward+backward on the CPU in torch.library's machinery (the dispatcher's
Python kernel, the generated autograd wrapper, ``setup_context``, the backward custom op), more than the
whole computation at ``(128, 16)``. In plain eager mode on CPU tensors that run the engine (backend
``"torch"``), ``route`` hands the public ops a ``Function`` per op whose forward is the custom op's CPU
forward (``_cpu``), whose backward is its CPU backward, and which saves the same tensors (the inputs and the
seed, the per-dimension statistics): the same values bit for bit, the same gradients and errors, measured
at a few microseconds of overhead. Without grad (or with no input that requires it) the engine is called
directly, as the custom op's ``forward_no_grad`` does.

Everything else goes through the custom ops: ``torch.compile`` and ``torch.jit.trace`` (which must see
them in the graph), a TorchDispatchMode or TorchFunctionMode (FakeTensor, tracing, counting), tensor subclasses
and functorch transforms, the Triton backend, and every device but the CPU.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import backend
from . import _cpu

_PLAIN = (Tensor, torch.nn.Parameter)


def _plain_cpu(t: Tensor) -> bool:
    return type(t) in _PLAIN and t.device.type == "cpu" and not torch._C._functorch.is_functorch_wrapped_tensor(t)


def applies(first: Tensor, *others: Tensor) -> bool:
    """Whether a call on these tensors takes the fast path now: eager (not compiling, no dispatch or function
    mode), plain CPU tensors (no FakeTensor, subclass or functorch wrapper) and the engine as the backend."""
    return (
        not torch.compiler.is_compiling()
        and not torch._C._get_tracing_state()  # torch.jit.trace records the custom op, not the engine's ATen ops
        and _get_current_dispatch_mode() is None
        and not torch._C._is_torch_function_mode_enabled()
        and _plain_cpu(first) and all(_plain_cpu(t) for t in others)
        and backend.decide(first) == "torch"
    )


def route(name: str, *tensors: Tensor) -> Optional[Callable]:
    """The fast function for custom op ``fastvae::<name>`` (same arguments, same results) when ``applies`` to
    the op's input tensors, else None:
    ``(_eager.route("moments", z) or torch.ops.fastvae.moments)(z, dim, correction)``."""
    return _FAST[name] if applies(*tensors) else None


def _grad_needed(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and torch._C._any_requires_grad(*(t for t in tensors if t is not None))


# ----------------------------------------------------------------------------- reparameterize_kl
def _reparameterize_forward(mu, logvar, seed, reduction, clamp, event_dims):
    return _cpu.reparameterize_kl_events(mu, logvar, seed, reduction, clamp, event_dims)


def _reparameterize_backward(grad_z, grad_kl, mu, logvar, seed, reduction, clamp, event_dims):
    return _cpu.reparameterize_kl_events_backward(grad_z, grad_kl, mu, logvar, seed, reduction, clamp, event_dims)


class _ReparameterizeKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, logvar, seed, reduction, clamp, event_dims):
        ctx.save_for_backward(mu, logvar, seed)
        ctx.reduction, ctx.clamp, ctx.event_dims = reduction, clamp, event_dims
        return _reparameterize_forward(mu, logvar, seed, reduction, clamp, event_dims)

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        mu, logvar, seed = ctx.saved_tensors
        grads = _reparameterize_backward(grad_z, grad_kl, mu, logvar, seed, ctx.reduction, ctx.clamp, ctx.event_dims)
        return (*grads, None, None, None, None)


class _Reparameterize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, logvar, seed, clamp, event_dims):
        ctx.save_for_backward(mu, logvar, seed)
        ctx.clamp, ctx.event_dims = clamp, event_dims
        return _reparameterize_forward(mu, logvar, seed, None, clamp, event_dims)[0]

    @staticmethod
    def backward(ctx, grad_z):
        mu, logvar, seed = ctx.saved_tensors
        grads = _reparameterize_backward(grad_z, None, mu, logvar, seed, "none", ctx.clamp, ctx.event_dims)
        return (*grads, None, None, None)


class _KLDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, logvar, reduction, clamp, event_dims):
        ctx.save_for_backward(mu, logvar)
        ctx.reduction, ctx.clamp, ctx.event_dims = reduction, clamp, event_dims
        return _reparameterize_forward(mu, logvar, None, reduction, clamp, event_dims)[1]

    @staticmethod
    def backward(ctx, grad_kl):
        mu, logvar = ctx.saved_tensors
        grads = _reparameterize_backward(None, grad_kl, mu, logvar, None, ctx.reduction, ctx.clamp, ctx.event_dims)
        return (*grads, None, None, None)


def reparameterize_kl(mu: Tensor, logvar: Tensor, seed: Tensor, reduction: str, clamp=None,
                      event_dims: int = 1) -> tuple[Tensor, Tensor]:
    if _grad_needed(mu, logvar):
        return _ReparameterizeKL.apply(mu, logvar, seed, reduction, clamp, event_dims)
    return _reparameterize_forward(mu, logvar, seed, reduction, clamp, event_dims)


def reparameterize(mu: Tensor, logvar: Tensor, seed: Tensor, clamp=None, event_dims: int = 1) -> Tensor:
    if _grad_needed(mu, logvar):
        return _Reparameterize.apply(mu, logvar, seed, clamp, event_dims)
    return _reparameterize_forward(mu, logvar, seed, None, clamp, event_dims)[0]


def kl_divergence(mu: Tensor, logvar: Tensor, reduction: str, clamp=None, event_dims: int = 1) -> Tensor:
    if _grad_needed(mu, logvar):
        return _KLDivergence.apply(mu, logvar, reduction, clamp, event_dims)
    return _reparameterize_forward(mu, logvar, None, reduction, clamp, event_dims)[1]


# ---------------------------------------------------------------------------------- balanced_mse
def _balanced_mse_backward(ctx, grad_loss):
    x_hat, x, gamma2 = ctx.saved_tensors
    need_x_hat, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x_hat, grad_x = _cpu.balanced_mse_backward(grad_loss, x_hat, x, gamma2, ctx.reduction, need_x=need_x)
    return grad_x_hat if need_x_hat else None, grad_x if need_x else None


class _BalancedMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hat, x, gamma2, reduction, full):
        loss, sse = _cpu.balanced_mse_forward(x_hat, x, gamma2, reduction=reduction, full=full)
        ctx.save_for_backward(x_hat, x, gamma2)
        ctx.reduction = reduction
        ctx.mark_non_differentiable(sse)
        return loss, sse

    @staticmethod
    def backward(ctx, grad_loss, _grad_sse):
        return (*_balanced_mse_backward(ctx, grad_loss), None, None, None)


def _update_forward(x_hat, x, running_mse, reduction, full, momentum, rule):
    gamma2 = running_mse.detach().clone()
    loss, sse = _cpu.balanced_mse_forward(x_hat, x, gamma2, reduction=reduction, full=full)
    _cpu.update_running_mse(running_mse, sse / x_hat.numel(), momentum=momentum, rule=rule)
    return loss, gamma2


class _BalancedMSEUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hat, x, running_mse, reduction, full, momentum, rule):
        loss, gamma2 = _update_forward(x_hat, x, running_mse, reduction, full, momentum, rule)
        ctx.save_for_backward(x_hat, x, gamma2)
        ctx.reduction = reduction
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (*_balanced_mse_backward(ctx, grad_loss), None, None, None, None, None)


def balanced_mse(x_hat: Tensor, x: Tensor, gamma2: Tensor, reduction: str, full: bool) -> tuple[Tensor, Tensor]:
    if _grad_needed(x_hat, x):
        return _BalancedMSE.apply(x_hat, x, gamma2, reduction, full)
    return _cpu.balanced_mse_forward(x_hat, x, gamma2, reduction=reduction, full=full)


def balanced_mse_update(x_hat: Tensor, x: Tensor, running_mse: Tensor, reduction: str, full: bool, momentum: float,
                        rule: str, backend_name: str = "torch") -> Tensor:
    """``_BalancedMSEUpdate.apply`` of ``ops.balanced_mse`` (the loss; ``running_mse`` updated in place)."""
    if _grad_needed(x_hat, x, running_mse):
        return _BalancedMSEUpdate.apply(x_hat, x, running_mse, reduction, full, momentum, rule)
    return _update_forward(x_hat, x, running_mse, reduction, full, momentum, rule)[0]


# ------------------------------------------------------------------ moments, variance_law, renormalize
class _Moments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, dim, correction):
        mean, var = _cpu.moments(z, dim=dim, correction=correction)
        ctx.save_for_backward(z, mean)
        ctx.dim, ctx.correction = dim, correction
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        z, mean = ctx.saved_tensors
        return _cpu.moments_backward(grad_mean, grad_var, z, mean, ctx.dim, ctx.correction), None, None


class _VarianceLaw(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, logvar):
        mean, var = _cpu.variance_law(mu, logvar)
        ctx.save_for_backward(mu, logvar, mean)
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        mu, logvar, mean = ctx.saved_tensors
        grad_mu, grad_logvar = _cpu.variance_law_backward(grad_mean, grad_var, mu, logvar, mean)
        return grad_mu, (grad_logvar if ctx.needs_input_grad[1] else None)


def _renormalize_forward(z, target_mean, target_var, target_mean_value, target_var_value, dim, mode, eps):
    tm = target_mean if target_mean is not None else target_mean_value
    tv = target_var if target_var is not None else target_var_value
    mean, var = _cpu.moments(z, dim=dim)
    out = _cpu.renormalize_from_moments(z, mean, var, tm, tv, dim=dim, mode=mode, eps=eps)
    scalars = _cpu.scalar_renormalization(var, tv) if mode == "scalar" else var.new_empty(0)
    return out, mean, var, scalars


class _Renormalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, target_mean, target_var, target_mean_value, target_var_value, dim, mode, eps):
        out, mean, var, scalars = _renormalize_forward(z, target_mean, target_var, target_mean_value, target_var_value,
                                                       dim, mode, eps)
        ctx.save_for_backward(z, mean, var, scalars, target_var)
        ctx.mark_non_differentiable(mean, var, scalars)
        ctx.target_var_value, ctx.dim, ctx.mode, ctx.eps = target_var_value, dim, mode, eps
        return out, mean, var, scalars

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var, _grad_scalars):
        z, mean, var, _, target_var = ctx.saved_tensors
        tv = target_var if target_var is not None else ctx.target_var_value
        grad_z = _cpu.renormalize_backward(grad, z, mean, var, tv, dim=ctx.dim, mode=ctx.mode, eps=ctx.eps)
        return grad_z, None, None, None, None, None, None, None


def moments(z: Tensor, dim: int, correction: int) -> tuple[Tensor, Tensor]:
    if _grad_needed(z):
        return _Moments.apply(z, dim, correction)
    return _cpu.moments(z, dim=dim, correction=correction)


def variance_law(mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    if _grad_needed(mu, logvar):
        return _VarianceLaw.apply(mu, logvar)
    return _cpu.variance_law(mu, logvar)


def renormalize(z, target_mean, target_var, target_mean_value, target_var_value, dim, mode, eps):
    if _grad_needed(z):
        return _Renormalize.apply(z, target_mean, target_var, target_mean_value, target_var_value, dim, mode, eps)
    return _renormalize_forward(z, target_mean, target_var, target_mean_value, target_var_value, dim, mode, eps)


_FAST: dict[str, Callable] = {
    "reparameterize_kl": reparameterize_kl, "reparameterize": reparameterize, "kl_divergence": kl_divergence,
    "balanced_mse": balanced_mse, "balanced_mse_update_": balanced_mse_update, "moments": moments,
    "variance_law": variance_law, "renormalize": renormalize,
}
