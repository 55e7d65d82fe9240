"""The engine (``fastvae.ops.engine``: formulas, loops, the Philox stream) against the spec (``fastvae.reference``)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastvae
from fastvae import reference
from fastvae.ops import engine
from fastvae.ops.engine import formulas, philox as _philox
from fastvae.ops._checks import REDUCTIONS

from helpers import DTYPES, RTOL, RTOL_NOISE


def _close(actual, expected, dtype, scale=None, noise=False):
    """Within 4 x the dtype's tolerance; with ``noise``, at least the compiled noise's (a float32 stream
    within 4 ulp of the spec's, which float64 results carry)."""
    rtol = (max(RTOL[dtype], RTOL_NOISE[dtype]) if noise else RTOL[dtype]) * 4
    atol = rtol * (float(expected.abs().max()) if scale is None else scale)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


@pytest.fixture(params=["numba", "torch"])
def noise_engine(request, monkeypatch):
    """Both ways the engine runs: the numba loops and PyTorch ops."""
    if request.param == "numba":
        if not _philox.numba_available():
            pytest.skip("numba is not installed")  # the torch parameter still runs
    else:
        monkeypatch.setattr(_philox, "compiled", lambda: None)
    return request.param


def _within_ulps(actual, expected, ulps):
    """``|actual - expected| <= ulps`` float32 ulps of ``expected``, element by element."""
    spacing = torch.from_numpy(np.spacing(expected.abs().numpy().astype(np.float32))).double()
    return bool(((actual.double() - expected.double()).abs() <= ulps * spacing).all())


SEEDS = [0, 2**32 - 1, 2**40 + 17, 2**63 - 1]


@pytest.mark.parametrize("n", [1, 7, 4099])
@pytest.mark.parametrize("seed", SEEDS)
def test_noise_is_the_spec(noise_engine, n, seed):
    """PyTorch ops: the spec's bits. numba: the same words and uniforms, Box-Muller in float32 polynomials
    within 4 ulp of the spec's float32 log, sqrt and cos (measured: 3 ulp at most over 2**20 draws)."""
    s = torch.tensor([seed])
    eps, want = _philox.philox_randn(s, (n,), torch.device("cpu")), reference.philox_randn(s, (n,))
    if noise_engine == "torch":
        assert torch.equal(eps, want)
    else:
        assert _within_ulps(eps, want, 4)


def test_compiled_noise_stays_within_4_ulp_over_a_million_draws():
    if not _philox.numba_available():
        pytest.skip("numba is not installed")
    s = torch.tensor([20261126])
    eps, want = _philox.philox_randn(s, (1 << 20,), torch.device("cpu")), reference.philox_randn(s, (1 << 20,))
    assert _within_ulps(eps, want, 4)
    assert float((eps == want).double().mean()) > 0.5  # most draws round to the spec's very bits


def test_noise_split_over_threads_is_the_same_stream(monkeypatch):
    if not _philox.numba_available():
        pytest.skip("numba is not installed")
    s = torch.tensor([99])
    one_thread = _philox.philox_randn(s, (1001,), torch.device("cpu"))
    monkeypatch.setattr(_philox, "PARALLEL_MIN", 16)
    monkeypatch.setattr(_philox, "DRAWING_PARALLEL_MIN", 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        eps = _philox.philox_randn(s, (1001,), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(eps, one_thread)


def test_the_loops_that_draw_split_over_threads_from_fewer_elements():
    """Drawing the noise costs several times what the other loops cost an element: a second thread pays for itself
    from fewer elements there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        n = 2 * _philox.DRAWING_PARALLEL_MIN
        assert n < 2 * _philox.PARALLEL_MIN
        calls = []
        assert _philox.split(lambda a, b: calls.append((a, b)), 4, n, draws=True)
        assert sorted(calls) == [(0, 2), (2, 4)]
        calls.clear()
        assert not _philox.split(lambda a, b: calls.append((a, b)), 4, n)
        assert calls == [(0, 4)]
    finally:
        torch.set_num_threads(threads)


def _latents(dtype):
    h = torch.randn(33, 2 * 24, dtype=torch.float64)
    mu, logvar = h.chunk(2, dim=-1)  # strided views, as an encoder's output gives them
    return mu.to(dtype), (0.5 * logvar).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reparameterize_kl_matches_the_spec(noise_engine, dtype, reduction):
    mu, logvar = _latents(dtype)
    seed = torch.tensor([1234])
    z = engine.reparameterize_kl_rows(mu, logvar, seed, None)[0]
    kl = engine.reparameterize_kl_rows(mu, logvar, None, reduction)[1]
    z_both, kl_both = engine.reparameterize_kl_rows(mu, logvar, seed, reduction)
    z_ref, kl_ref = reference.reparameterize_kl(mu, logvar, seed=seed, reduction=reduction)
    assert torch.equal(z_both, z)
    _close(kl_both, kl_ref, dtype)
    assert z.dtype == z_ref.dtype and kl.dtype == kl_ref.dtype and kl.shape == kl_ref.shape
    _close(z, z_ref, dtype, noise=True)
    _close(kl, kl_ref, dtype)
    kl_shape = kl_ref.shape
    for grad_z, grad_kl in ((torch.randn(mu.shape, dtype=dtype), torch.randn(kl_shape).to(kl_ref.dtype)),
                            (None, torch.randn(kl_shape).to(kl_ref.dtype)), (torch.randn(mu.shape, dtype=dtype), None),
                            (None, None)):
        got = engine.reparameterize_kl_rows_backward(grad_z, grad_kl, mu, logvar, seed, reduction)
        want = reference.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, seed, reduction)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            _close(g, w, dtype, noise=grad_z is not None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_balanced_mse_matches_the_spec(dtype, reduction):
    x_hat, x = torch.rand(2, 8, 3, 5, dtype=torch.float64).to(dtype).unbind(0)
    gamma2 = torch.tensor(0.03)
    loss, sse = engine.balanced_mse_forward(x_hat, x, gamma2, reduction=reduction, full=True)
    loss_ref, sse_ref = reference.balanced_mse_forward(x_hat, x, gamma2, reduction=reduction, full=True)
    assert loss.dtype == loss_ref.dtype and loss.shape == loss_ref.shape
    _close(loss, loss_ref, dtype)
    _close(sse, sse_ref, dtype)
    grad = torch.randn(loss_ref.shape).to(loss_ref.dtype)
    for got, want in zip(engine.balanced_mse_backward(grad, x_hat, x, gamma2, reduction),
                         reference.balanced_mse_backward(grad, x_hat, x, gamma2, reduction)):
        _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [0, 1])
def test_moments_and_renormalize_match_the_spec(dtype, dim):
    z = (torch.randn(40, 6, 3, dtype=torch.float64) * 0.1 + 3.0).to(dtype)
    for got, want in zip(engine.moments(z, dim, 1), reference.moments(z, dim, 1)):
        _close(got, want, dtype)
    mean, var = reference.moments(z, dim)
    g_mean, g_var = torch.randn(mean.shape), torch.randn(var.shape)
    _close(engine.moments_backward(g_mean, g_var, z, mean, dim, 1),
           reference.moments_backward(g_mean, g_var, z, mean, dim, 1), dtype)
    _close(engine.moments_backward(None, g_var, z, mean, dim),
           reference.moments_backward(None, g_var, z, mean, dim), dtype)
    _close(engine.moments_backward(g_mean, None, z, mean, dim),
           reference.moments_backward(g_mean, None, z, mean, dim), dtype)
    target_mean, target_var = torch.randn(mean.shape), torch.rand(var.shape) + 0.5
    grad = torch.randn(z.shape, dtype=torch.float64).to(dtype)
    for mode in reference.RENORMALIZE_MODES:
        got = engine.renormalize_from_moments(z, mean, var, target_mean, target_var, dim=dim, mode=mode)
        want = reference.renormalize_from_moments(z, mean, var, target_mean, target_var, dim=dim, mode=mode)
        _close(got, want, dtype)
        got = engine.renormalize_backward(grad, z, mean, var, target_var, dim=dim, mode=mode)
        want = reference.renormalize_backward(grad, z, mean, var, target_var, dim=dim, mode=mode)
        _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variance_law_matches_the_spec(dtype):
    mu, logvar = _latents(dtype)
    for got, want in zip(engine.variance_law(mu, logvar), reference.variance_law(mu, logvar)):
        _close(got, want, dtype)
    mean, _ = reference.variance_law(mu, logvar)
    g_mean, g_var = torch.randn(mean.shape), torch.randn(mean.shape)
    for got, want in zip(engine.variance_law_backward(g_mean, g_var, mu, logvar, mean),
                         reference.variance_law_backward(g_mean, g_var, mu, logvar, mean)):
        _close(got, want, dtype)


def test_ops_run_the_engine_on_cpu_tensors(monkeypatch):
    """Without numba the custom ops call the engine's PyTorch ops (not the spec) for CPU tensors."""
    import fastvae

    monkeypatch.setattr(_philox, "compiled", lambda: None)
    calls = []
    real = formulas.reparameterize_kl_rows
    monkeypatch.setattr(formulas, "reparameterize_kl_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    with fastvae.use_backend("torch"):
        fastvae.reparameterize(torch.zeros(2, 3), torch.zeros(2, 3), seed=1)
    assert calls == [1]


def test_a_failing_numba_falls_back_to_torch_with_a_warning(monkeypatch):
    pytest.importorskip("numba")

    def broken(kernels):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(_philox, "_probe", broken)
    _philox.compiled.cache_clear()
    try:
        with pytest.warns(UserWarning, match="numba failed"):
            assert _philox.compiled() is None
        s = torch.tensor([3])
        assert torch.equal(_philox.philox_randn(s, (10,), torch.device("cpu")), reference.philox_randn(s, (10,)))
        mu = torch.randn(4, 5)
        z, _, _ = engine.reparameterize_kl(mu, mu, s, "sum", None, 1)
        assert torch.equal(z, engine.reparameterize_kl_rows(mu, mu, s, "sum")[0])  # the engine's PyTorch ops
    finally:
        _philox.compiled.cache_clear()


# ------------------------------------------------------------- reparameterize_kl in _cpu_numba's loops
def _compiled_or_skip():
    if not _philox.numba_available():
        pytest.skip("numba is not installed")


def _event_latents(layout: str, dtype):
    """``(mu, logvar, event_dims)``: the halves of an encoder's (N, 2D) output, a channels_last
    (B, C, H, W) latent, and a transposed 3-D view with two event dims; logvar spread so a clamp cuts some."""
    g = torch.Generator().manual_seed(7)
    if layout == "chunk":
        mu, logvar = torch.randn(33, 2 * 24, generator=g, dtype=torch.float64).chunk(2, dim=-1)
        event_dims = 1
    elif layout == "channels_last":
        h = torch.randn(3, 2 * 4, 5, 7, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last)
        mu, logvar = h.chunk(2, dim=1)
        event_dims = 3
    else:
        mu, logvar = (torch.randn(5, 3, 2, generator=g, dtype=torch.float64).transpose(0, 2) for _ in range(2))
        event_dims = 2
    return mu.to(dtype), (2 * logvar).to(dtype), event_dims


def _spec_grads(mu, logvar, seed, reduction, clamp, event_dims, grad_z, grad_kl):
    """The gradients of the float64 spec by autograd, for the outputs that get a gradient."""
    mu64, lv64 = mu.double().requires_grad_(), logvar.double().requires_grad_()
    z, kl = reference.reparameterize_kl(mu64, lv64, seed=seed, reduction=reduction, event_dims=event_dims,
                                              logvar_clamp=clamp)
    outputs = [(z, grad_z), (kl, grad_kl)]
    outs, grads = zip(*[(o, g.double()) for o, g in outputs if g is not None])
    return torch.autograd.grad(outs, (mu64, lv64), grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["chunk", "channels_last", "transposed"])
@pytest.mark.parametrize("clamp", [None, (-1.0, 0.5)], ids=["no_clamp", "clamp"])
def test_compiled_reparameterize_kl_matches_the_spec(dtype, reduction, layout, clamp):
    """The numba loops against the float64 spec (which draws the same float32 eps): values, the memory
    format, and the gradients of every combination of gradients flowing in."""
    _compiled_or_skip()
    mu, logvar, event_dims = _event_latents(layout, dtype)
    seed = torch.tensor([2**40 + 3])
    z, kl, eps = engine.reparameterize_kl(mu, logvar, seed, reduction, clamp, event_dims, keep_noise=True)
    assert eps.dtype == torch.float32 and eps.shape == mu.shape and eps.is_contiguous()  # (4 channels: copies)
    _close(eps, reference.philox_randn(seed, mu.shape), torch.float32, noise=True)  # z's noise, kept for backward
    z_ref, kl_ref = reference.reparameterize_kl(mu.double(), logvar.double(), seed=seed, reduction=reduction,
                                                      event_dims=event_dims, logvar_clamp=clamp)
    assert z.dtype == mu.dtype and z.stride() == torch.empty_like(mu).stride()
    assert kl.shape == kl_ref.shape and kl.dtype == (mu.dtype if reduction == "none" else torch.float32)
    _close(z, z_ref, dtype)
    _close(kl, kl_ref, dtype)
    g = torch.Generator().manual_seed(1)
    grad_z = torch.randn(mu.shape, generator=g).to(dtype)
    grad_kl = torch.randn(kl.shape, generator=g).to(kl.dtype)
    for g_z, g_kl in ((grad_z, grad_kl), (None, grad_kl), (grad_z, None)):
        drawn = engine.reparameterize_kl_backward(g_z, g_kl, mu, logvar, seed, reduction, clamp, event_dims)
        kept = engine.reparameterize_kl_backward(g_z, g_kl, mu, logvar, seed, reduction, clamp, event_dims, eps)
        want = _spec_grads(mu, logvar, seed, reduction, clamp, event_dims, g_z, g_kl)
        for a, b, w in zip(drawn, kept, want):
            assert a.dtype == mu.dtype and a.stride() == torch.empty_like(mu).stride()
            _close(a, w, dtype)
            assert torch.equal(a, b)  # the noise read back is the noise drawn again, bit for bit


def test_compiled_reparameterize_kl_keeps_infinities_and_nans_as_the_spec():
    _compiled_or_skip()
    mu = torch.tensor([[0.0, 1.0, -1.0, 3e38, 0.0, 0.0, float("nan"), 0.0, 2.0]])
    logvar = torch.tensor([[88.0, -88.0, 100.0, 0.0, float("inf"), -float("inf"), 0.0, float("nan"), -200.0]])
    seed = torch.tensor([5])
    z, kl, _ = engine.reparameterize_kl(mu, logvar, seed, "none", None, 1)
    z_ref, kl_ref = reference.reparameterize_kl(mu, logvar, seed=seed, reduction="none")
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_compiled_reparameterize_kl_split_over_threads_changes_no_bit(monkeypatch):
    _compiled_or_skip()
    mu, logvar = torch.randn(37, 11), torch.randn(37, 11)
    seed, g_z, g_kl = torch.tensor([8]), torch.randn(37, 11), torch.tensor(0.7)

    def run():
        forward = engine.reparameterize_kl(mu, logvar, seed, "batchmean", (-2.0, 2.0), 1, keep_noise=True)
        kept, drawn = (engine.reparameterize_kl_backward(g_z, g_kl, mu, logvar, seed, "batchmean", (-2.0, 2.0), 1, eps)
                       for eps in (forward[2], None))
        return forward + kept + drawn

    one_thread = run()
    monkeypatch.setattr(_philox, "PARALLEL_MIN", 16)
    monkeypatch.setattr(_philox, "DRAWING_PARALLEL_MIN", 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        split = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(split, one_thread))


def test_every_loop_asks_llvm_for_512_bit_vectors():
    """LLVM prefers 256-bit vectors on Intel's AVX-512 CPUs unless a function asks otherwise; the loops ask (1.5x
    on the noise of a Xeon), and a CPU without AVX-512 ignores it. (Cached code cannot be inspected: the noise loop
    is compiled afresh to see the attribute reach LLVM.)"""
    import inspect

    import numba

    _compiled_or_skip()
    loops = _philox.compiled()
    fresh = numba.njit(loops.normal_loop.py_func)
    fresh(1, 0, 1, np.empty(1, np.float32))
    assert '"prefer-vector-width"="512"' in "".join(fresh.inspect_llvm().values())
    for name in ("normal_loop", "reparameterize_kl_rows", "reparameterize_kl_rows_backward", "column_moments",
                 "rows_variance_law_backward", "_row_sum", "reparameterize_kl_pixels",
                 "reparameterize_kl_pixels_backward"):
        assert "_wide_vectors()" in inspect.getsource(getattr(loops, name).py_func), name


@pytest.mark.parametrize("reduction", ["per_sample", "batchmean", "none", None])
def test_the_halves_of_an_encoder_output_are_read_in_place(reduction):
    """The halves of a (B, 2C, H, W) output's chunk(2, dim=1), whose samples are long rows at one stride, reach the
    forward and backward loops as their own memory (no copy), with the bits of contiguous copies."""
    _compiled_or_skip()
    h = torch.randn(3, 2 * 4, 8, 9)
    mean, logvar = h.chunk(2, dim=1)
    address, stride, owner = formulas._float32_rows_at(logvar, 4 * 8 * 9)
    assert (address, stride, owner) == (logvar.data_ptr(), 2 * 4 * 8 * 9, logvar)
    seed = torch.tensor([3])
    got = engine.reparameterize_kl(mean, logvar, seed, reduction, (-2.0, 2.0),
                                   3, keep_noise=True)
    want = engine.reparameterize_kl(mean.contiguous(), logvar.contiguous(), seed, reduction, (-2.0, 2.0), 3,
                                    keep_noise=True)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)
    if reduction is None:
        return
    g_z, g_kl = torch.randn(mean.shape), torch.randn(want[1].shape)
    for eps in (got[2], None):  # the kept noise, and the noise drawn again
        got_grads = engine.reparameterize_kl_backward(g_z, g_kl, mean, logvar, seed, reduction, (-2.0, 2.0), 3, eps)
        want_grads = engine.reparameterize_kl_backward(g_z, g_kl, mean.contiguous(), logvar.contiguous(), seed,
                                                       reduction, (-2.0, 2.0), 3, eps)
        assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))


def _channels_last_halves(shape, dtype=torch.float32):
    """The halves of ``chunk(2, dim=1)`` of a channels_last encoder output of ``shape`` (4-D or 5-D)."""
    g = torch.Generator().manual_seed(len(shape) + shape[0])
    h = (2 * torch.randn(shape, generator=g)).to(dtype)
    h = h.contiguous(memory_format=torch.channels_last if h.dim() == 4 else torch.channels_last_3d)
    return h.chunk(2, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 2 * 32, 4, 6), (2, 2 * 16, 2, 3, 3), (1, 2 * 16, 8, 8)], ids=["4d", "5d", "one"])
@pytest.mark.parametrize("reduction", ["none", "per_sample", "batchmean", "sum", None])
def test_channels_last_latents_run_in_memory_order(monkeypatch, dtype, shape, reduction):
    """channels_last latents (the halves of a channels_last encoder output) are read in place and z, the elementwise
    KL, the kept noise and the gradients written channels_last, in memory order, no copy either way: the noise still
    that of the logical flat index (z, eps and the gradients bit for bit those of contiguous copies), the KL within
    float32 rounding (summed in another order), whatever the threads' split and the parts of a single sample."""
    _compiled_or_skip()
    monkeypatch.setattr(_philox, "DRAWING_PARALLEL_MIN", 16)  # a single sample cut into parts, split over threads
    monkeypatch.setattr(_philox, "PARALLEL_MIN", 16)
    mean, logvar = _channels_last_halves(shape, dtype)
    read = []
    real_at = formulas._pixels_at
    monkeypatch.setattr(formulas, "_pixels_at", lambda t: read.append(t) or real_at(t))
    seed, clamp = torch.tensor([13]), (-2.0, 1.0)
    fmt = torch.empty_like(mean).stride()
    got = engine.reparameterize_kl(mean, logvar, seed, reduction, clamp, mean.dim() - 1, keep_noise=True)
    assert len(read) == 2 and read[0] is mean and read[1] is logvar
    if dtype == torch.float32:  # read in place
        assert real_at(mean)[3] is mean and real_at(logvar)[3] is logvar
    want = engine.reparameterize_kl(mean.contiguous(), logvar.contiguous(), seed, reduction, clamp, mean.dim() - 1,
                                    keep_noise=True)
    z, kl, eps = got
    assert z.stride() == fmt and eps.stride() == torch.empty_like(mean, dtype=torch.float32).stride()
    assert torch.equal(z, want[0]) and torch.equal(eps, want[2])
    if reduction == "none":
        assert kl.stride() == fmt and torch.equal(kl, want[1])
    elif reduction is not None:
        assert kl.shape == want[1].shape and kl.dtype == want[1].dtype
        torch.testing.assert_close(kl, want[1], rtol=2e-7, atol=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = engine.reparameterize_kl(mean, logvar, seed, reduction, clamp, mean.dim() - 1, keep_noise=True)
    finally:
        torch.set_num_threads(threads)
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(got, one_thread))
    g = torch.Generator().manual_seed(2)
    g_z = torch.randn(mean.shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last
                                                                     if mean.dim() == 4 else torch.channels_last_3d)
    g_kl = None if reduction is None else torch.randn(want[1].shape, generator=g).to(want[1].dtype)
    for g_z_in in (g_z, g_z.contiguous()):  # a gradient in the other format is copied, the same values
        for noise in (eps, None):  # the kept noise, and the noise drawn again
            read.clear()
            grads = engine.reparameterize_kl_backward(g_z_in, g_kl, mean, logvar, seed, reduction or "none", clamp,
                                                      mean.dim() - 1, noise)
            assert read[0] is mean and read[1] is logvar and any(t is g_z_in for t in read)
            want_grads = engine.reparameterize_kl_backward(g_z.contiguous(), g_kl, mean.contiguous(),
                                                           logvar.contiguous(), seed, reduction or "none", clamp,
                                                           mean.dim() - 1, None if noise is None else want[2])
            for a, b in zip(grads, want_grads):
                assert a.stride() == fmt and a.dtype == dtype and torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["per_sample", "batchmean", "none"])
def test_a_single_long_sample_is_cut_into_parts_that_threads_share(monkeypatch, reduction):
    """One sample (an SD3 latent: one row) would keep one thread; cut into parts it splits over threads, with the
    same noise and z, the KL to float32 rounding (its parts' sums added in order), and no bit from the split."""
    _compiled_or_skip()
    h = torch.randn(1, 2 * 4, 8, 8)
    mean, logvar = h.chunk(2, dim=1)
    seed = torch.tensor([21])

    def run():
        return engine.reparameterize_kl(mean, logvar, seed, reduction, (-2.0, 2.0), 3, keep_noise=True)

    whole = run()
    monkeypatch.setattr(_philox, "DRAWING_PARALLEL_MIN", 16)
    assert formulas._row_parts(1, 256) == 8 and formulas._row_parts(2, 256) == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = run()
        torch.set_num_threads(3)
        split = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(split, one_thread))
    assert torch.equal(one_thread[0], whole[0]) and torch.equal(one_thread[2], whole[2])
    torch.testing.assert_close(one_thread[1], whole[1], rtol=1e-6, atol=1e-6)


def test_the_public_op_runs_the_compiled_loops_on_cpu(monkeypatch):
    _compiled_or_skip()
    import fastvae

    calls = []
    for name in ("_fused_forward", "_fused_backward"):
        real = getattr(formulas, name)
        monkeypatch.setattr(formulas, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    mu = torch.randn(4, 3, requires_grad=True)
    with fastvae.use_backend("torch"):
        z, kl = fastvae.reparameterize_kl(mu, torch.zeros(4, 3), seed=1)
    (z.sum() + kl).backward()
    assert calls == ["_fused_forward", "_fused_backward"]


def test_latents_off_the_cpu_never_reach_the_compiled_loops():
    """The engine also serves the ``torch`` backend on other devices; the numba loops read CPU memory only."""
    mu, seed = torch.empty(4, 3, device="meta"), torch.tensor([1], device="meta")
    z, kl, _ = engine.reparameterize_kl(mu, mu, seed, "batchmean", None, 1)
    grads = engine.reparameterize_kl_backward(mu, torch.empty((), device="meta"), mu, mu, seed, "batchmean",
                                                   None, 1)
    assert {t.device.type for t in (z, kl, *grads)} == {"meta"} and z.shape == (4, 3)


_FORK_SCRIPT = """
import os, torch
from fastvae.ops.engine import philox as _philox
torch.set_num_threads(2)
seed = torch.tensor([1])
parent = _philox.philox_randn(seed, (1 << 18,), torch.device("cpu"))  # on the parent's thread pool
pid = os.fork()
if pid == 0:
    child = _philox.philox_randn(seed, (1 << 18,), torch.device("cpu"))
    os._exit(0 if torch.equal(parent, child) else 3)
raise SystemExit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_splits_its_loops_over_threads_of_its_own():
    """A DataLoader worker forked after the parent used its thread pool: the child's pool has no threads, so
    handing it work hung forever before the pool was reset at fork."""
    _compiled_or_skip()
    result = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_compiled_moments_and_variance_law_match_the_spec(dtype, monkeypatch):
    """The numba column loop (two float64 passes) behind ``moments`` and ``variance_law`` on the CPU: every dim of a
    4-D tensor, a transposed view, a mean far above the spread, against the float64 spec; the public ops run it."""
    _compiled_or_skip()
    calls = []
    real = formulas._column_moments
    monkeypatch.setattr(formulas, "_column_moments", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(4)
    z = (1e3 + torch.randn(6, 5, 4, 3, generator=g)).to(dtype)
    for t, dim, correction in ((z, 0, 0), (z, 2, 1), (z, 3, 0), (z.transpose(0, 2), 1, 1)):
        mean, var = fastvae.moments(t, dim=dim, correction=correction)
        want_var, want_mean = torch.var_mean(t.double(), dim=dim, correction=correction)
        assert mean.dtype == var.dtype == torch.float32 and mean.shape == want_mean.shape
        _close(mean, want_mean, dtype)
        _close(var, want_var, torch.float32)  # float64 sums of the (exact) float32 inputs
    mu, logvar = (torch.randn(40, 6, generator=g).to(dtype).requires_grad_() for _ in range(2))
    mean, var = fastvae.variance_law(mu, logvar)
    mu64, logvar64 = (t.detach().double().requires_grad_() for t in (mu, logvar))
    want_mean, want_var = reference.variance_law(mu64, logvar64)
    _close(mean, want_mean, dtype)
    _close(var, want_var, torch.float32)
    assert len(calls) == 5
    backward_calls = []
    real_backward = formulas._rows_variance_law_backward
    monkeypatch.setattr(formulas, "_rows_variance_law_backward",
                        lambda *a: backward_calls.append(1) or real_backward(*a))
    g_mean, g_var = torch.randn(6, generator=g), torch.randn(6, generator=g)
    got = torch.autograd.grad((mean, var), (mu, logvar), (g_mean, g_var))
    want = torch.autograd.grad((want_mean, want_var), (mu64, logvar64), (g_mean.double(), g_var.double()))
    for a, w in zip(got, want):
        assert a.dtype == dtype and a.shape == w.shape
        _close(a, w, dtype)
    assert backward_calls == [1]



@pytest.mark.parametrize("shape", [(1000, 24), (7, 3), (300, 2048)])
def test_variance_law_backward_loop_in_flat_blocks_matches_the_spec(shape):
    """The backward loop runs blocks of whole rows as flat loops against tiled per-column factors: rows that fill a
    block unevenly, a last block cut short, a row longer than a block, against the float64 spec."""
    _compiled_or_skip()
    g = torch.Generator().manual_seed(5)
    mu, logvar = (torch.randn(shape, generator=g).requires_grad_() for _ in range(2))
    g_mean, g_var = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    got = torch.autograd.grad(fastvae.variance_law(mu, logvar), (mu, logvar), (g_mean, g_var))
    mu64, logvar64 = (t.detach().double().requires_grad_() for t in (mu, logvar))
    want = torch.autograd.grad(reference.variance_law(mu64, logvar64), (mu64, logvar64),
                               (g_mean.double(), g_var.double()))
    for a, w in zip(got, want):
        _close(a, w, torch.float32)
