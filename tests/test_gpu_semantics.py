"""The kernels under GPU semantics in the interpreter (tests/gpu_semantics.py): float arguments as
fp32, programs in shuffled and concurrent order, every reduction with many programs, and launches
that never finish. Each harness is shown to catch the defect it is for."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import fastvae
from fastvae import reference
from fastvae.backend import use_backend
from fastvae.kernels import moments as moments_kernels
from gpu_semantics import abort_launch_after_atomics, fp32_abi, program_order

SEEDS = (0, 1, 2)
ORDERS = ("shuffled", "concurrent")


@pytest.fixture
def many_chunks(monkeypatch):
    """Column reductions over many row chunks on the CPU too (a GPU uses ~4 per multiprocessor)."""
    monkeypatch.setattr(moments_kernels, "_CPU_PROGRAMS", 64)
    moments_kernels._target_programs.cache_clear()
    yield
    moments_kernels._target_programs.cache_clear()


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# ------------------------------------------------------------------------------------- fp32 ABI
def test_fp32_abi_mode_catches_a_float_scale_factor():
    """The harness itself: a float64 kernel scaled by a Python float 1/3 is exact in the plain
    interpreter and ~1e-8 off under the fp32 ABI, as on a GPU."""

    @triton.jit
    def scale_kernel(x_ptr, out_ptr, scale):
        tl.store(out_ptr, tl.load(x_ptr) * scale)

    x, out = torch.ones(1, dtype=torch.float64), torch.empty(1, dtype=torch.float64)
    scale_kernel[(1,)](x, out, 1.0 / 3.0)
    assert out.item() == 1.0 / 3.0
    with fp32_abi():
        scale_kernel[(1,)](x, out, 1.0 / 3.0)
    assert out.item() != 1.0 / 3.0 and out.item() == pytest.approx(1.0 / 3.0, rel=1e-7)


def _close64(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "per_sample", "none"])
def test_float64_reparameterize_kl_under_fp32_abi(reduction):
    mu, logvar = (t.requires_grad_(True) for t in _f64(2, 3, 7).unbind(0))  # 1/3 is no float32
    with use_backend("triton"), fp32_abi():
        _, kl = fastvae.reparameterize_kl(mu, logvar, seed=5, reduction=reduction)
        kl.backward(torch.ones_like(kl))
    m64, l64 = (t.detach().clone().requires_grad_(True) for t in (mu, logvar))
    expected = reference.kl_divergence(m64, l64, reduction=reduction)
    expected.backward(torch.ones_like(expected))
    _close64(kl, expected)
    _close64(mu.grad, m64.grad)
    _close64(logvar.grad, l64.grad)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "per_sample", "none"])
def test_float64_balanced_mse_under_fp32_abi(reduction):
    x_hat, x = _f64(2, 3, 11).unbind(0)
    x_hat.requires_grad_(True)
    running = torch.tensor(0.3, dtype=torch.float64)
    with use_backend("triton"), fp32_abi():
        loss = fastvae.balanced_mse(x_hat, x, running, reduction=reduction, full=True, momentum=0.99, rule="ema")
        loss.backward(torch.ones_like(loss))
    h64 = x_hat.detach().clone().requires_grad_(True)
    expected_running = torch.tensor(0.3, dtype=torch.float64)
    expected = reference.balanced_mse(h64, x, expected_running, reduction=reduction, full=True, momentum=0.99,
                                      rule="ema")
    expected.backward(torch.ones_like(expected))
    _close64(loss, expected)
    _close64(x_hat.grad, h64.grad)
    _close64(running, expected_running)


@pytest.mark.parametrize("mode", ["per_dim", "scalar"])
def test_float64_renormalize_under_fp32_abi(mode, many_chunks):
    z = _f64(90, 3).requires_grad_(True)
    with use_backend("triton"), fp32_abi():
        out = fastvae.renormalize(z, 0.1, 1.7, mode=mode, eps=1e-7)
        out.backward(torch.ones_like(out))
    z64 = z.detach().clone().requires_grad_(True)
    expected = reference.renormalize(z64, 0.1, 1.7, mode=mode, eps=1e-7)
    expected.backward(torch.ones_like(expected))
    _close64(out, expected)
    torch.testing.assert_close(z.grad, z64.grad, rtol=1e-10, atol=1e-12)  # a gradient that sums to ~0


# ---------------------------------------------------------------------------- program order
def test_shuffled_and_concurrent_orders_catch_a_kernel_that_assumes_program_order():
    """The harness itself: a reduction whose program n - 1 sums the partials as if it ran last is right in
    the interpreter's order and wrong under a shuffled or concurrent one; a reduction that takes its
    ticket before storing its partial is right in any whole-program order, wrong under interleaving."""

    @triton.jit
    def assumes_last(x_ptr, partial_ptr, out_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        tl.store(partial_ptr + pid, tl.load(x_ptr + pid))
        if pid == tl.num_programs(0) - 1:
            idx = tl.arange(0, BLOCK)
            tl.store(out_ptr, tl.sum(tl.load(partial_ptr + idx, mask=idx < n, other=0.0), axis=0))

    @triton.jit
    def ticket_first(x_ptr, partial_ptr, ticket_ptr, out_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        last = tl.atomic_add(ticket_ptr, 1) == tl.num_programs(0) - 1
        tl.store(partial_ptr + pid, tl.load(x_ptr + pid))
        if last:
            idx = tl.arange(0, BLOCK)
            tl.store(out_ptr, tl.sum(tl.load(partial_ptr + idx, mask=idx < n, other=0.0), axis=0))

    n = 16
    x = torch.arange(1.0, n + 1)

    def run(kernel, ticket):
        partial, out = torch.zeros(n), torch.zeros(1)
        args = (x, partial, torch.zeros(1, dtype=torch.int32), out) if ticket else (x, partial, out)
        kernel[(n,)](*args, n, BLOCK=n)
        return out.item()

    total = float(x.sum())
    assert run(assumes_last, False) == total and run(ticket_first, True) == total
    caught = {mode: [] for mode in ORDERS}
    for mode in ORDERS:
        for seed in range(5):
            with program_order(mode, seed):
                caught[mode].append((run(assumes_last, False) != total, run(ticket_first, True) != total))
    assert any(a for a, _ in caught["shuffled"]) and not any(b for _, b in caught["shuffled"])
    assert any(a for a, _ in caught["concurrent"]) and any(b for _, b in caught["concurrent"])


def _reductions():
    """Every cross-program reduction of the ops, each with many programs: ``name -> (call, reference)``."""
    mu, logvar = torch.randn(2, 700, 5).unbind(0)
    x_hat, x = torch.rand(2, 9, 3000).unbind(0)
    z = torch.randn(300, 300)
    h = torch.randn(300, 600)

    def grad_of(fn, t):
        t = t.detach().clone().requires_grad_(True)
        out = fn(t)
        (out if isinstance(out, torch.Tensor) else sum(o.sum() for o in out)).sum().backward()
        return t.grad

    def balanced(reduction):
        running = torch.tensor(0.2)
        loss = fastvae.balanced_mse(x_hat, x, running, reduction=reduction)
        return loss, running

    return {
        "kl_sum": lambda: fastvae.kl_divergence(mu, logvar, reduction="sum"),
        "kl_batchmean": lambda: fastvae.reparameterize_kl(mu, logvar, seed=3)[1],
        "balanced_mse_batchmean": lambda: balanced("batchmean"),
        "balanced_mse_per_sample": lambda: balanced("per_sample"),
        "moments": lambda: fastvae.moments(z),
        "variance_law": lambda: fastvae.variance_law(*h.chunk(2, dim=-1)),
        "renormalize_scalar": lambda: fastvae.renormalize(z, 0.0, 2.0, mode="scalar"),
        "renormalize_scalar_backward": lambda: grad_of(
            lambda t: fastvae.renormalize(t, 0.0, 2.0, mode="scalar") * torch.arange(300.0), z),
        "renormalize_per_dim_backward": lambda: grad_of(lambda t: fastvae.renormalize(t) * torch.arange(300.0), z),
    }


@pytest.mark.parametrize("mode", ORDERS)
@pytest.mark.parametrize("name", list(_reductions()))
def test_reductions_are_bit_identical_in_any_program_order(name, mode, many_chunks):
    """Every reduction with many programs (finish kernels with several, moments_partial with many
    chunks) gives the same bits as in program order, whatever order and interleaving the programs run in."""
    call = _reductions()[name]
    with use_backend("triton"):
        expected = call()
        for seed in SEEDS[:2] if mode == "concurrent" else SEEDS:
            with program_order(mode, seed) as order:
                actual = call()
            assert order.max_programs >= 8, (name, order.max_programs)
            for a, e in zip(actual if isinstance(actual, tuple) else (actual,),
                            expected if isinstance(expected, tuple) else (expected,)):
                assert torch.equal(a, e), (name, mode, seed)


def test_finish_kernels_run_with_many_programs(many_chunks):
    """The finish kernels of moments and of the renormalize backward run with more than one program."""
    from fastvae.kernels import count_launches

    z = torch.randn(300, 600, requires_grad=True)
    with use_backend("triton"), program_order("shuffled"), count_launches() as launches:
        fastvae.renormalize(z, mode="scalar").sum().backward()
    assert launches["moments_finish_kernel"] == 1 and launches["renormalize_bwd_finish_kernel"] == 1
    plan = moments_kernels._plan(torch.Size((1, 300, 600)), z.device)
    assert plan.n_col_blocks > 1 and plan.n_chunks >= 8


# ----------------------------------------------------------------------------- aborted launch
@pytest.mark.parametrize("op", ["kl", "balanced_mse", "renormalize_scalar"])
def test_a_launch_that_never_finishes_leaves_nothing_behind(op):
    """A reduction launch that dies after some programs took their ticket must not change any later
    launch (a ticket counter cached across launches stayed non-zero, and every later total was wrong)."""
    mu, logvar = torch.randn(2, 700, 5).unbind(0)
    x_hat, x = torch.rand(2, 9, 3000).unbind(0)
    z = torch.randn(50, 600)  # three column blocks: three programs take a ticket
    calls = {
        "kl": lambda: fastvae.kl_divergence(mu, logvar, reduction="sum"),
        "balanced_mse": lambda: fastvae.balanced_mse(x_hat, x, torch.tensor(0.2), update=False),
        "renormalize_scalar": lambda: fastvae.renormalize(z, mode="scalar"),
    }
    with use_backend("triton"):
        expected = calls[op]()
        with abort_launch_after_atomics(1), pytest.raises(Exception, match="launch aborted"):
            calls[op]()
        assert torch.equal(calls[op](), expected)
        assert torch.equal(calls[op](), expected)
