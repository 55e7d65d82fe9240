"""The CPU engine (``fastvae.ops._cpu``, ``_cpu_philox``) against the spec (``fastvae.reference``)."""
from __future__ import annotations

import pytest
import torch

from fastvae import reference
from fastvae.ops import _cpu, _cpu_philox
from fastvae.ops._checks import REDUCTIONS

from helpers import DTYPES, RTOL


def _close(actual, expected, dtype, scale=None):
    rtol = RTOL[dtype] * 4
    atol = rtol * (float(expected.abs().max()) if scale is None else scale)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


@pytest.fixture(params=["numba", "torch"])
def noise_engine(request, monkeypatch):
    """Both ways the engine draws its words: the numba loop and the PyTorch integer ops."""
    if request.param == "numba":
        if not _cpu_philox.numba_available():
            pytest.skip("numba is not installed")  # the torch parameter still runs
    else:
        monkeypatch.setattr(_cpu_philox, "_compiled", lambda: None)
    return request.param


@pytest.mark.parametrize("n", [1, 7, 4099])
@pytest.mark.parametrize("seed", [0, 2**32 - 1, 2**40 + 17, 2**63 - 1])
def test_noise_is_the_spec_bit_for_bit(noise_engine, n, seed):
    s = torch.tensor([seed])
    assert torch.equal(_cpu_philox.philox_randn(s, (n,), torch.device("cpu")), reference.philox_randn(s, (n,)))


def test_noise_split_over_threads_is_the_same_stream(monkeypatch):
    if not _cpu_philox.numba_available():
        pytest.skip("numba is not installed")
    monkeypatch.setattr(_cpu_philox, "_PARALLEL_MIN", 16)
    s = torch.tensor([99])
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        eps = _cpu_philox.philox_randn(s, (1001,), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(eps, reference.philox_randn(s, (1001,)))


def _latents(dtype):
    h = torch.randn(33, 2 * 24, dtype=torch.float64)
    mu, logvar = h.chunk(2, dim=-1)  # strided views, as an encoder's output gives them
    return mu.to(dtype), (0.5 * logvar).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reparameterize_kl_matches_the_spec(noise_engine, dtype, reduction):
    mu, logvar = _latents(dtype)
    seed = torch.tensor([1234])
    z = _cpu.reparameterize(mu, logvar, seed=seed)
    kl = _cpu.kl_divergence(mu, logvar, reduction=reduction)
    z_both, kl_both = _cpu.reparameterize_kl(mu, logvar, seed, reduction)
    z_ref, kl_ref = reference.reparameterize_kl(mu, logvar, seed=seed, reduction=reduction)
    assert torch.equal(z_both, z)
    _close(kl_both, kl_ref, dtype)
    assert z.dtype == z_ref.dtype and kl.dtype == kl_ref.dtype and kl.shape == kl_ref.shape
    _close(z, z_ref, dtype)
    _close(kl, kl_ref, dtype)
    kl_shape = kl_ref.shape
    for grad_z, grad_kl in ((torch.randn(mu.shape, dtype=dtype), torch.randn(kl_shape).to(kl_ref.dtype)),
                            (None, torch.randn(kl_shape).to(kl_ref.dtype)), (torch.randn(mu.shape, dtype=dtype), None),
                            (None, None)):
        got = _cpu.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, seed, reduction)
        want = reference.reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, seed, reduction)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            _close(g, w, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_balanced_mse_matches_the_spec(dtype, reduction):
    x_hat, x = torch.rand(2, 8, 3, 5, dtype=torch.float64).to(dtype).unbind(0)
    gamma2 = torch.tensor(0.03)
    loss, sse = _cpu.balanced_mse_forward(x_hat, x, gamma2, reduction=reduction, full=True)
    loss_ref, sse_ref = reference.balanced_mse_forward(x_hat, x, gamma2, reduction=reduction, full=True)
    assert loss.dtype == loss_ref.dtype and loss.shape == loss_ref.shape
    _close(loss, loss_ref, dtype)
    _close(sse, sse_ref, dtype)
    grad = torch.randn(loss_ref.shape).to(loss_ref.dtype)
    for got, want in zip(_cpu.balanced_mse_backward(grad, x_hat, x, gamma2, reduction),
                         reference.balanced_mse_backward(grad, x_hat, x, gamma2, reduction)):
        _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [0, 1])
def test_moments_and_renormalize_match_the_spec(dtype, dim):
    z = (torch.randn(40, 6, 3, dtype=torch.float64) * 0.1 + 3.0).to(dtype)
    for got, want in zip(_cpu.moments(z, dim, 1), reference.moments(z, dim, 1)):
        _close(got, want, dtype)
    mean, var = reference.moments(z, dim)
    g_mean, g_var = torch.randn(mean.shape), torch.randn(var.shape)
    _close(_cpu.moments_backward(g_mean, g_var, z, mean, dim, 1),
           reference.moments_backward(g_mean, g_var, z, mean, dim, 1), dtype)
    _close(_cpu.moments_backward(None, g_var, z, mean, dim),
           reference.moments_backward(None, g_var, z, mean, dim), dtype)
    _close(_cpu.moments_backward(g_mean, None, z, mean, dim),
           reference.moments_backward(g_mean, None, z, mean, dim), dtype)
    target_mean, target_var = torch.randn(mean.shape), torch.rand(var.shape) + 0.5
    grad = torch.randn(z.shape, dtype=torch.float64).to(dtype)
    for mode in reference.RENORMALIZE_MODES:
        got = _cpu.renormalize_from_moments(z, mean, var, target_mean, target_var, dim=dim, mode=mode)
        want = reference.renormalize_from_moments(z, mean, var, target_mean, target_var, dim=dim, mode=mode)
        _close(got, want, dtype)
        got = _cpu.renormalize_backward(grad, z, mean, var, target_var, dim=dim, mode=mode)
        want = reference.renormalize_backward(grad, z, mean, var, target_var, dim=dim, mode=mode)
        _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variance_law_matches_the_spec(dtype):
    mu, logvar = _latents(dtype)
    for got, want in zip(_cpu.variance_law(mu, logvar), reference.variance_law(mu, logvar)):
        _close(got, want, dtype)
    mean, _ = reference.variance_law(mu, logvar)
    g_mean, g_var = torch.randn(mean.shape), torch.randn(mean.shape)
    for got, want in zip(_cpu.variance_law_backward(g_mean, g_var, mu, logvar, mean),
                         reference.variance_law_backward(g_mean, g_var, mu, logvar, mean)):
        _close(got, want, dtype)


def test_ops_run_the_engine_on_cpu_tensors(monkeypatch):
    """The custom ops call the engine (not the spec) for CPU tensors."""
    import fastvae

    calls = []
    real = _cpu.reparameterize_kl
    monkeypatch.setattr(_cpu, "reparameterize_kl", lambda *a, **k: calls.append(1) or real(*a, **k))
    with fastvae.use_backend("torch"):
        fastvae.reparameterize(torch.zeros(2, 3), torch.zeros(2, 3), seed=1)
    assert calls == [1]


def test_a_failing_numba_falls_back_to_torch_with_a_warning(monkeypatch):
    numba = pytest.importorskip("numba")

    def broken(**_):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(numba, "njit", broken)
    _cpu_philox._compiled.cache_clear()
    try:
        with pytest.warns(UserWarning, match="numba failed"):
            assert _cpu_philox._compiled() is None
        s = torch.tensor([3])
        assert torch.equal(_cpu_philox.philox_randn(s, (10,), torch.device("cpu")), reference.philox_randn(s, (10,)))
    finally:
        _cpu_philox._compiled.cache_clear()
