"""balanced_mse and BalancedMSE against the float64 reference and torch's GaussianNLLLoss, on both backends.

Tolerances (relative to |expected| plus the magnitude of the terms summed, see helpers.py):
float32 1e-5, float16 1e-3, bfloat16 1e-2, float64 1e-12.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastvae
from fastvae import reference
from fastvae.backend import use_backend
from fastvae.kernels import count_launches
from fastvae.kernels._launch import ZERO_FILL
from torch.utils._python_dispatch import TorchDispatchMode
from helpers import DTYPES, RTOL, assert_close_scaled

BACKENDS = ("triton", "torch")
pytestmark = pytest.mark.devices  # each test once per device (conftest.devices_under_test)
REDUCTIONS = ("none", "per_sample", "batchmean", "sum")
SHAPES = ((1,), (7,), (5, 3, 5, 5), (3, 1500), (2, 1, 7, 9))


def _sample_dims(x):
    return tuple(range(1, x.dim()))


def _check_against_reference(x_hat, x, gamma2, reduction, full):
    leaf_hat = x_hat.detach().clone().requires_grad_(True)
    leaf_x = x.detach().clone().requires_grad_(True)
    running = gamma2.clone()
    loss = fastvae.balanced_mse(leaf_hat, leaf_x, running, reduction=reduction, full=full, update=False)
    upstream = torch.randn(loss.shape, dtype=torch.float64).to(loss.dtype)
    loss.backward(upstream)

    hat64 = x_hat.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    loss64 = reference.balanced_mse_loss(hat64, x64, gamma2.double(), reduction=reduction, full=full)
    loss64.backward(upstream.double())

    acc = reference.accumulation_dtype(torch.promote_types(x_hat.dtype, x.dtype))
    assert loss.dtype == (x_hat.dtype if reduction == "none" else acc)
    dtype = x_hat.dtype if RTOL[x_hat.dtype] > RTOL[x.dtype] else x.dtype
    with torch.no_grad():
        g2 = gamma2.double()
        err2 = (hat64 - x64) ** 2
        terms = err2 / (2 * g2) + abs(math.log(g2)) / 2 + (0.5 * math.log(2 * math.pi) if full else 0.0)
        scale = reference.reduce_loss(terms, reduction, _sample_dims(x_hat), torch.float64)
        assert_close_scaled(loss, loss64, rtol=RTOL[dtype], scale=scale)
        assert_close_scaled(leaf_hat.grad, hat64.grad, rtol=RTOL[dtype])
        assert_close_scaled(leaf_x.grad, x64.grad, rtol=RTOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_and_gradients_match_float64_reference(backend, dtype, shape):
    x_hat = torch.rand(shape, dtype=torch.float64).to(dtype)
    x = torch.rand(shape, dtype=torch.float64).to(dtype)
    with use_backend(backend):
        for reduction in REDUCTIONS:
            for full in (False, True):
                _check_against_reference(x_hat, x, torch.tensor(0.037), reduction, full)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_strided_views(backend):
    """bfloat16 reconstructions against float32 data (autocast), and non-contiguous inputs."""
    base = torch.rand(6, 2, 40)
    x_hat = base[:, 0, ::2].to(torch.bfloat16)
    x = base[:, 1, 1::2]
    with use_backend(backend):
        for reduction in REDUCTIONS:
            _check_against_reference(x_hat, x, torch.tensor(0.5), reduction, False)
            _check_against_reference(base.transpose(0, 2)[:, 0], base.transpose(0, 2)[:, 1], torch.tensor(2.0),
                                     reduction, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma2", [1e-8, 1e-3, 1.0, 1e4])
def test_extreme_variances(backend, gamma2):
    x_hat, x = torch.rand(2, 4, 33).unbind(0)
    with use_backend(backend):
        for reduction in REDUCTIONS:
            _check_against_reference(x_hat, x, torch.tensor(gamma2), reduction, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("full", [False, True])
def test_equals_gaussian_nll_with_running_mse_as_variance(backend, full):
    """balanced_mse(batchmean) == GaussianNLLLoss(full, reduction='sum')(x_hat, x, gamma^2) / batch size."""
    x_hat, x = torch.rand(2, 16, 1, 8, 8, dtype=torch.float64).unbind(0)
    running = torch.tensor(0.02, dtype=torch.float64)
    variance = running.expand_as(x_hat)
    nll = torch.nn.GaussianNLLLoss(full=full, reduction="sum")(x_hat, x, variance)
    with use_backend(backend):
        loss = fastvae.balanced_mse(x_hat, x, running, full=full, update=False)
        per_element = fastvae.balanced_mse(x_hat, x, running, full=full, update=False, reduction="none")
    torch.testing.assert_close(loss, nll / x.shape[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(per_element, torch.nn.GaussianNLLLoss(full=full, reduction="none")(x_hat, x, variance),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["min-ema", "ema"])
def test_update_rules(backend, rule):
    x_hat, x = torch.rand(2, 8, 10).unbind(0)
    mse = ((x_hat.double() - x.double()) ** 2).mean().item()
    m = 0.9
    for start in (1.0, mse / 10):  # above the batch MSE (both rules decrease it) and below (min-ema keeps it)
        running = torch.tensor(start)
        with use_backend(backend):
            loss = fastvae.balanced_mse(x_hat, x, running, momentum=m, rule=rule)
        ema = m * start + (1 - m) * mse
        expected = min(start, ema) if rule == "min-ema" else ema
        assert running.item() == pytest.approx(expected, rel=1e-6)
        # the loss used gamma^2 as it was before the update
        expected_loss = reference.balanced_mse_loss(x_hat, x, torch.tensor(start))
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_uses_the_variance_of_the_forward(backend):
    """The in-place update after the forward must not change the gradient of that forward."""
    x_hat = torch.rand(4, 5, requires_grad=True)
    x = torch.rand(4, 5)
    running = torch.tensor(3.0)
    with use_backend(backend):
        loss = fastvae.balanced_mse(x_hat, x, running, reduction="sum")
        assert running.item() < 3.0
        loss.backward()
    torch.testing.assert_close(x_hat.grad, (x_hat - x).detach() / 3.0)


def test_no_update_in_eval_mode_or_without_update():
    x_hat, x = torch.rand(2, 8, 10).unbind(0)
    module = fastvae.BalancedMSE(momentum=0.5)
    module.eval()
    module(x_hat, x)
    assert module.running_mse.item() == 1.0
    running = torch.tensor(1.0)
    fastvae.balanced_mse(x_hat, x, running, update=False)
    assert running.item() == 1.0
    module.train()
    module(x_hat, x)
    assert module.running_mse.item() < 1.0
    assert module.gamma.item() == pytest.approx(math.sqrt(module.running_mse.item()))


def test_module_state_round_trips():
    module = fastvae.BalancedMSE(momentum=0.5, rule="ema")
    module(*torch.rand(2, 3, 4).unbind(0))
    restored = fastvae.BalancedMSE(momentum=0.5, rule="ema")
    restored.load_state_dict(module.state_dict())
    assert "running_mse" in module.state_dict()
    assert restored.running_mse.item() == module.running_mse.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    x_hat = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    running = torch.tensor(0.3, dtype=torch.float64)
    with use_backend(backend):
        for reduction in REDUCTIONS:
            assert torch.autograd.gradcheck(
                lambda a, b: fastvae.balanced_mse(a, b, running, reduction=reduction, update=False, full=True),
                (x_hat, x),
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x_hat = torch.rand(4, 6, requires_grad=True)
    x = torch.rand(4, 6)
    gamma2 = torch.tensor(0.5)
    with use_backend(backend):
        for reduction in REDUCTIONS:
            torch.library.opcheck(torch.ops.fastvae.balanced_mse.default, (x_hat, x, gamma2, reduction, True))
            torch.library.opcheck(
                torch.ops.fastvae.balanced_mse_update_.default,
                (x_hat.detach(), x, gamma2.clone(), reduction, True, 0.9, "min-ema"),
            )
        torch.library.opcheck(  # (grad_loss, grad_sse, x_hat, x, gamma2, reduction, full, needs, backend_name)
            torch.ops.fastvae.balanced_mse_backward.default,
            (torch.randn(4), None, x_hat.detach(), x, gamma2, "per_sample", True, [True, False], backend),
        )


def test_torch_compile_fullgraph():
    def loss_fn(x_hat, x, gamma2):
        return fastvae.balanced_mse(torch.sigmoid(x_hat), x, gamma2, update=False) * 2

    x_hat = torch.randn(8, 12, requires_grad=True)
    x = torch.rand(8, 12)
    gamma2 = torch.tensor(0.1)
    compiled = torch.compile(loss_fn, fullgraph=True)
    loss_c = compiled(x_hat, x, gamma2)
    (grad_c,) = torch.autograd.grad(loss_c, x_hat)
    loss_e = loss_fn(x_hat, x, gamma2)
    (grad_e,) = torch.autograd.grad(loss_e, x_hat)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(grad_c, grad_e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_with_update_matches_eager(backend):
    """With update=True (the training default) inductor must give the gradient of gamma^2 before the
    update, as eager does (it used to read the running MSE after the in-place update)."""
    def step(x_hat, x, running):
        return fastvae.balanced_mse(torch.sigmoid(x_hat), x, running, momentum=0.5, rule="ema") * 2

    x = torch.rand(8, 12)
    results = []
    with use_backend(backend):
        for fn in (step, torch.compile(step, fullgraph=True, backend="inductor")):
            x_hat = torch.randn(8, 12, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
            running = torch.tensor(0.5)
            loss = fn(x_hat, x, running)
            loss.backward()
            results.append((loss.detach(), x_hat.grad, running.clone()))
    (loss_e, grad_e, running_e), (loss_c, grad_c, running_c) = results
    assert running_e.item() != 0.5  # the update happened
    torch.testing.assert_close(running_c, running_e)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(grad_c, grad_e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_runs_on_the_backend_of_its_forward(backend):
    """A forward inside use_backend(backend) whose backward runs after the block (or inside the other
    backend) runs the backward of the forward's backend."""
    other = "torch" if backend == "triton" else "triton"
    for update in (False, True):
        x_hat = torch.rand(4, 30, requires_grad=True)
        with use_backend(backend):
            loss = fastvae.balanced_mse(x_hat, torch.rand(4, 30), torch.tensor(1.0), update=update)
        with use_backend(other), count_launches() as launches:
            loss.backward()
        assert launches == ({"balanced_mse_bwd_kernel": 1} if backend == "triton" else {}), launches


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_inputs_are_saved_for_backward(backend):
    x_hat = torch.rand(16, 1, 8, 8, requires_grad=True)
    x = torch.rand(16, 1, 8, 8)
    saved = []
    with use_backend(backend):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = fastvae.balanced_mse(x_hat, x, torch.tensor(1.0))
        loss.backward()
    assert sorted(t.numel() for t in saved) == [1, x.numel(), x.numel()]
    assert {t.data_ptr() for t in saved if t.numel() > 1} == {x_hat.data_ptr(), x.data_ptr()}


@pytest.mark.parametrize("update", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_one_launch_forward_and_one_backward(reduction, update):
    """One kernel forward (after the memset that zeroes its ticket workspace; the running-MSE update is in
    the kernel) and one backward."""
    x_hat = torch.rand(9, 3000, requires_grad=True)  # several column blocks and row blocks
    x = torch.rand(9, 3000)
    with use_backend("triton"):
        with count_launches() as forward:
            loss = fastvae.balanced_mse(x_hat, x, torch.tensor(1.0), reduction=reduction, update=update)
        with count_launches() as backward:
            loss.sum().backward()
    assert forward == {"balanced_mse_fwd_kernel": 1, ZERO_FILL: 1}, forward
    assert sum(backward.values()) == 1, backward


class _TopLevelOps(TorchDispatchMode):
    """The ATen and custom ops called at the top level of a block (what runs around the custom ops)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_update_adds_no_aten_op_around_the_kernel():
    """The running-MSE update runs in the kernel's last program: no clone, division or ATen op around it."""
    x_hat = torch.rand(6, 50, requires_grad=True)
    x, running = torch.rand(6, 50), torch.tensor(1.0)
    with use_backend("triton"), _TopLevelOps() as mode:
        fastvae.balanced_mse(x_hat, x, running)
    # detach/view launch nothing; reading the value (_local_scalar_dense) is the input check, on CPU only
    launched = [op for op in mode.ops if op not in ("aten.detach", "aten.view", "aten._local_scalar_dense")]
    assert launched == ["fastvae.balanced_mse_update_"], mode.ops
    assert running.item() < 1.0


# -------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "x_hat, x, running, kwargs, error, match",
    [
        (torch.zeros(3, 4), torch.zeros(3, 5), torch.tensor(1.0), {}, ValueError, "same shape"),
        (torch.zeros(3, 4), torch.zeros(3, 4, device="meta"), torch.tensor(1.0), {}, ValueError, "same device"),
        (torch.zeros(0, 4), torch.zeros(0, 4), torch.tensor(1.0), {}, ValueError, "empty"),
        (torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), torch.tensor(1.0), {}, TypeError,
         "float16"),
        (torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor([1.0, 2.0]), {}, ValueError, "one-element floating"),
        (torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor(1), {}, ValueError, "one-element floating"),
        (torch.zeros(3, 4), torch.zeros(3, 4), 1.0, {}, ValueError, "one-element floating"),
        (torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor(0.0), {}, ValueError, "positive"),
        (torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor(-1.0), {}, ValueError, "positive"),
        (torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor(float("nan")), {}, ValueError, "positive"),
        (torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor(1.0), {"reduction": "avg"}, ValueError, "reduction"),
        (torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor(1.0), {"rule": "max"}, ValueError, "rule"),
        (torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor(1.0), {"momentum": 1.5}, ValueError, "momentum"),
    ],
)
def test_bad_inputs_raise_before_any_kernel(x_hat, x, running, kwargs, error, match):
    with use_backend("triton"), count_launches() as launches:
        with pytest.raises(error, match=match) as info:
            fastvae.balanced_mse(x_hat, x, running, **kwargs)
    assert "balanced_mse" in str(info.value)
    assert not launches


def test_module_rejects_bad_settings():
    with pytest.raises(ValueError, match="rule"):
        fastvae.BalancedMSE(rule="median")
    with pytest.raises(ValueError, match="init must be positive"):
        fastvae.BalancedMSE(init=0.0)


def test_finite_check_names_the_tensor(monkeypatch):
    x = torch.zeros(2, 3)
    x_hat = torch.zeros(2, 3)
    x_hat[0, 1] = float("inf")
    monkeypatch.setenv("FASTVAE_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match="balanced_mse: x_hat holds inf"):
        fastvae.balanced_mse(x_hat, x, torch.tensor(1.0))


@pytest.mark.parametrize("full", (False, True))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_pass_cpu_form_equals_the_elementwise_definition(dtype, reduction, full):
    """The CPU implementation (``reference.balanced_mse_forward``: the loss of batchmean and sum from the
    sum of squared errors in closed form) against the elementwise definition computed in float64."""
    torch.manual_seed(0)
    x_hat, x = torch.rand(6, 3, 7, 5).to(dtype), torch.rand(6, 3, 7, 5).to(dtype)
    gamma2 = torch.tensor(0.037)
    loss, sse = reference.balanced_mse_forward(x_hat, x, gamma2, reduction=reduction, full=full)
    expected = reference.balanced_mse_loss(x_hat.double(), x.double(), gamma2.double(), reduction=reduction, full=full)
    err2 = (x_hat.double() - x.double()) ** 2
    scale = (err2 / (2 * 0.037)).sum() if reduction in ("batchmean", "sum") else err2 / (2 * 0.037)
    rtol = {torch.float64: 1e-12}.get(dtype, 1e-5)  # inputs are exact in every dtype; the sums run in fp32 or fp64
    assert loss.dtype == (dtype if reduction == "none" else reference.accumulation_dtype(dtype))
    assert_close_scaled(loss, expected, rtol=rtol,
                        scale=scale if reduction != "per_sample" else err2.sum(dim=(1, 2, 3)) / (2 * 0.037))
    assert_close_scaled(sse, err2.sum(), rtol=rtol)
    assert not sse.requires_grad


def test_one_pass_cpu_form_is_differentiable():
    x_hat = torch.rand(4, 10, dtype=torch.float64, requires_grad=True)
    x = torch.rand(4, 10, dtype=torch.float64)
    loss, _ = reference.balanced_mse_forward(x_hat, x, torch.tensor(0.5, dtype=torch.float64))
    loss.backward()
    torch.testing.assert_close(x_hat.grad, (x_hat - x).detach() / 0.5 / 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_images_are_read_in_place_and_gradients_keep_the_format(backend):
    """channels_last reconstructions and images are flattened in memory order (a view, no copy), and the
    elementwise loss and the gradients come back channels_last, matching the reference."""
    from fastvae.ops._layout import pair_rows

    shape = (4, 3, 5, 6)
    x_hat = torch.rand(shape).to(memory_format=torch.channels_last).requires_grad_(True)
    x = torch.rand(shape).to(memory_format=torch.channels_last)
    rows_hat, rows_x, order = pair_rows(x_hat, x)
    assert order == [2, 3, 1] and rows_hat.data_ptr() == x_hat.data_ptr() and rows_x.data_ptr() == x.data_ptr()
    for reduction in REDUCTIONS:
        _check_against_reference(x_hat, x, torch.tensor(0.3), reduction, True)
        leaf = x_hat.detach().clone().requires_grad_(True)
        with use_backend(backend):
            loss = fastvae.balanced_mse(leaf, x, torch.tensor(0.3), reduction=reduction, update=False)
            loss.backward(torch.ones_like(loss))
        assert leaf.grad.is_contiguous(memory_format=torch.channels_last), (reduction, leaf.grad.stride())
        if reduction == "none":
            assert loss.is_contiguous(memory_format=torch.channels_last), loss.stride()
    with use_backend(backend):
        torch.library.opcheck(torch.ops.fastvae.balanced_mse.default, (x_hat, x, torch.tensor(0.3), "none", True))
