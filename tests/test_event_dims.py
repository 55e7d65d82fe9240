"""event_dims and logvar_clamp of reparameterize_kl, reparameterize and kl_divergence, and tuple dims of
moments and variance_law: against the float64 references, in every dtype, on both backends, for the
layouts of latent-diffusion encoders (contiguous, the halves of chunk(2, dim=1) of a contiguous and of a
channels_last (B, 2C, H, W) tensor, and a 5-D video latent).

Tolerances as in test_reparameterize.py (helpers.RTOL / RTOL_NOISE, scaled to the magnitude of the terms).
"""
from __future__ import annotations

import pytest
import torch

import fastvae
from fastvae import reference
from fastvae.backend import use_backend
from fastvae.kernels import count_launches
from helpers import DTYPES, RTOL, RTOL_NOISE, assert_close_scaled

BACKENDS = ("triton", "torch")
REDUCTIONS = ("none", "per_sample", "batchmean", "sum")
CLAMP = (-2.0, 1.5)


def _encoder_output(layout, dtype, spread=2.5):
    """``(mean, logvar)`` as diffusers gets them: ``chunk(2, dim=1)`` of an encoder output of ``layout``."""
    if layout == "video":
        h = torch.randn(2, 6, 2, 3, 4, dtype=torch.float64) * spread
    else:
        h = torch.randn(2, 6, 3, 5, dtype=torch.float64) * spread
    h = h.to(dtype)
    if layout == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last)
    mean, logvar = h.chunk(2, dim=1)
    if layout == "contiguous":
        mean, logvar = mean.contiguous(), logvar.contiguous()
    return mean, logvar


def _check(mu, logvar, reduction, event_dims, clamp, seed=77):
    dtype = mu.dtype
    leaf_mu = mu.detach().clone().requires_grad_(True)
    leaf_lv = logvar.detach().clone().requires_grad_(True)
    z, kl = fastvae.reparameterize_kl(leaf_mu, leaf_lv, seed=seed, reduction=reduction, event_dims=event_dims,
                                      logvar_clamp=clamp)
    mu64 = mu.detach().double().requires_grad_(True)
    lv64 = logvar.detach().double().requires_grad_(True)
    z64, kl64 = reference.reparameterize_kl(mu64, lv64, seed=seed, reduction=reduction, event_dims=event_dims,
                                                  logvar_clamp=clamp)
    assert z.shape == mu.shape and z.dtype == dtype
    assert kl.shape == kl64.shape, (reduction, event_dims)
    assert kl.dtype == (dtype if reduction == "none" else reference.accumulation_dtype(dtype))
    grad_z = torch.randn(z.shape, dtype=torch.float64)
    grad_kl = torch.randn(kl.shape, dtype=torch.float64)
    torch.autograd.backward((z, kl), (grad_z.to(z.dtype), grad_kl.to(kl.dtype)))
    torch.autograd.backward((z64, kl64), (grad_z.to(z.dtype).double(), grad_kl.to(kl.dtype).double()))

    with torch.no_grad():
        m = mu64.detach()
        lv = reference.clamp_logvar(lv64.detach(), clamp)
        eps = reference.philox_randn(seed, mu.shape).double()
        std = torch.exp(lv / 2)
        terms = 0.5 * (m * m + torch.exp(lv) + lv.abs() + 1)
        sample_dims = tuple(range(-event_dims, 0))
        kl_scale = reference.reduce_loss(terms, reduction, sample_dims, torch.float64)
        g_kl = reference.expand_reduced_grad(grad_kl, reduction, mu.shape, sample_dims)
        assert_close_scaled(z, z64, rtol=RTOL_NOISE[dtype], scale=m.abs() + std * eps.abs())
        assert_close_scaled(kl, kl64, rtol=RTOL[dtype], scale=kl_scale)
        assert_close_scaled(leaf_mu.grad, mu64.grad, rtol=RTOL_NOISE[dtype], scale=grad_z.abs() + (g_kl * m).abs())
        assert_close_scaled(leaf_lv.grad, lv64.grad, rtol=RTOL_NOISE[dtype],
                            scale=(grad_z * eps * std).abs() / 2 + g_kl.abs() * (torch.exp(lv) + 1) / 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "chunked", "channels_last", "video"))
def test_event_dims_and_clamp_match_float64_reference(backend, dtype, layout):
    mu, logvar = _encoder_output(layout, dtype)
    with use_backend(backend):
        extra = (2, mu.dim()) if layout == "chunked" else ()
        for event_dims in (1, mu.dim() - 1, *extra):
            for reduction in REDUCTIONS:
                _check(mu, logvar, reduction, event_dims, CLAMP if reduction != "sum" else None)
        _check(mu, logvar, "sum", mu.dim() - 1, CLAMP)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_with_event_dims_3_is_diffusers_kl(backend):
    mu, logvar = _encoder_output("chunked", torch.float32)
    lv = logvar.clamp(-30.0, 20.0)
    expected = 0.5 * torch.sum(mu.pow(2) + lv.exp() - 1.0 - lv, dim=[1, 2, 3])
    with use_backend(backend):
        per_sample = fastvae.kl_divergence(mu, logvar, reduction="per_sample", event_dims=3, logvar_clamp=(-30.0, 20.0))
        batchmean = fastvae.kl_divergence(mu, logvar, event_dims=3, logvar_clamp=(-30.0, 20.0))
    torch.testing.assert_close(per_sample, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(batchmean, expected.mean(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_gives_the_same_z_in_every_layout(backend):
    """The Philox counter is the logical flat index: contiguous, chunked, channels_last, any event_dims."""
    h = torch.randn(2, 8, 3, 4)
    with use_backend(backend):
        expected = fastvae.reparameterize(*(t.contiguous() for t in h.chunk(2, dim=1)), seed=5)
        for layout in (h, h.contiguous(memory_format=torch.channels_last)):
            mu, logvar = layout.chunk(2, dim=1)
            for event_dims in (1, 2, 3, 4):
                z = fastvae.reparameterize(mu, logvar, seed=5, event_dims=event_dims)
                torch.testing.assert_close(z, expected, rtol=0, atol=0)
                z2, _ = fastvae.reparameterize_kl(mu, logvar, seed=5, event_dims=event_dims)
                torch.testing.assert_close(z2, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamp_gradient_is_torch_clamp_gradient(backend):
    """Zero strictly outside [lo, hi], passed through at the bounds (torch.clamp's rule), forward clamped."""
    lo, hi = CLAMP
    logvar = torch.tensor([[-5.0, lo, -1.0, 0.0, hi, 4.0]], dtype=torch.float64, requires_grad=True)
    mu = torch.full_like(logvar, 0.5).requires_grad_(True)
    with use_backend(backend):
        z, kl = fastvae.reparameterize_kl(mu, logvar, seed=9, reduction="sum", logvar_clamp=CLAMP)
        (z.sum() + kl).backward()
    lv_ref = logvar.detach().clone().requires_grad_(True)
    z_ref, kl_ref = reference.reparameterize_kl(mu.detach(), lv_ref, seed=9, reduction="sum", logvar_clamp=CLAMP)
    (z_ref.sum() + kl_ref).backward()
    torch.testing.assert_close(logvar.grad, lv_ref.grad, rtol=1e-6, atol=1e-12)
    assert logvar.grad[0, 0] == 0 and logvar.grad[0, -1] == 0
    assert (logvar.grad[0, 1:5] != 0).all()
    torch.testing.assert_close(kl, kl_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamp_on_every_op(backend):
    mu, logvar = _encoder_output("chunked", torch.float32, spread=10.0)
    with use_backend(backend):
        z, kl = fastvae.reparameterize_kl(mu, logvar, seed=3, reduction="none", logvar_clamp=CLAMP)
        torch.testing.assert_close(fastvae.reparameterize(mu, logvar, seed=3, logvar_clamp=CLAMP), z, rtol=0, atol=0)
        torch.testing.assert_close(fastvae.kl_divergence(mu, logvar, reduction="none", logvar_clamp=CLAMP), kl,
                                   rtol=0, atol=0)
        unclamped = fastvae.kl_divergence(mu, logvar, reduction="none")
    assert not torch.allclose(kl, unclamped)


def test_event_dims_keep_one_launch_forward_and_backward():
    mu, logvar = (t.requires_grad_(True) for t in _encoder_output("chunked", torch.float32))
    with use_backend("triton"):
        with count_launches() as launches:
            z, kl = fastvae.reparameterize_kl(mu, logvar, event_dims=3, logvar_clamp=(-30.0, 20.0))
            (z.sum() + kl).backward()
    # the batch-mean total takes its ticket from a per-call zeroed workspace: one memset (zero_fill)
    assert launches == {"reparameterize_kl_fwd_kernel": 1, "zero_fill": 1, "reparameterize_kl_bwd_kernel": 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_clamp(backend):
    mu, logvar = (t.requires_grad_(True) for t in torch.randn(2, 3, 4).unbind(0))
    seed = torch.tensor([7])
    with use_backend(backend):
        torch.library.opcheck(torch.ops.fastvae.reparameterize_kl.default,
                              (mu, logvar, seed, "per_sample", [-1.0, 0.5]))
        # kl_divergence (no seed: no z) and reparameterize (no reduction: no KL) on the same op
        torch.library.opcheck(torch.ops.fastvae.reparameterize_kl.default, (mu, logvar, None, "none", [-1.0, 0.5]))
        torch.library.opcheck(torch.ops.fastvae.reparameterize_kl.default, (mu, logvar, seed, None, [-1.0, 0.5]))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"event_dims": 0}, ValueError, "event_dims must be in"),
        ({"event_dims": 5}, ValueError, "event_dims must be in"),
        ({"event_dims": True}, TypeError, "event_dims must be an int"),
        ({"event_dims": 2.0}, TypeError, "event_dims must be an int"),
        ({"logvar_clamp": (1.0,)}, ValueError, "pair"),
        ({"logvar_clamp": (2.0, 1.0)}, ValueError, "lo <= hi"),
        ({"logvar_clamp": (float("nan"), 1.0)}, ValueError, "finite"),
        ({"logvar_clamp": 3.0}, ValueError, "pair"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    mu, logvar = torch.randn(2, 2, 3, 3).unbind(0)
    for op in (fastvae.reparameterize_kl, fastvae.reparameterize, fastvae.kl_divergence):
        with pytest.raises(error, match=match):
            op(mu.unsqueeze(0), logvar.unsqueeze(0), **kwargs)


# --------------------------------------------------------------------------------- tuple dims
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moments_over_a_tuple_of_dims_is_var_mean(backend, dtype):
    z = (torch.randn(3, 4, 5, 6, dtype=torch.float64) * 2 + 3).to(dtype)
    z_cl = z.contiguous(memory_format=torch.channels_last)
    with use_backend(backend):
        for dims, correction in (((0, 2, 3), 0), ((0, -1), 1), ((1, 2), 0), ((2,), 1), ((0, 1, 2, 3), 0)):
            for tensor in (z, z_cl):
                mean, var = fastvae.moments(tensor, dim=dims, correction=correction)
                var64, mean64 = torch.var_mean(z.double(), dim=dims, correction=correction)
                assert mean.dtype == reference.accumulation_dtype(dtype) and mean.shape == mean64.shape
                scale = z.double().abs().amax()
                assert_close_scaled(mean, mean64, rtol=RTOL[dtype] * 4, scale=scale)
                assert_close_scaled(var, var64, rtol=RTOL[dtype] * 4, scale=scale * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moments_tuple_dims_gradient(backend):
    z = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: fastvae.moments(t, dim=(0, 2, 3), correction=1), (z,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variance_law_per_channel(backend, dtype):
    h = (torch.randn(3, 8, 4, 5, dtype=torch.float64) * 1.5).to(dtype)
    mu, logvar = h.chunk(2, dim=1)
    with use_backend(backend):
        mean, var = fastvae.variance_law(mu, logvar, dim=(0, 2, 3))
        mean_none, var_none = fastvae.variance_law(mu.movedim(1, -1), logvar.movedim(1, -1))
    mu64, lv64 = mu.double(), logvar.double()
    var_mu, mean64 = torch.var_mean(mu64, dim=(0, 2, 3), correction=0)
    var64 = var_mu + lv64.exp().mean(dim=(0, 2, 3))
    assert mean.shape == (4,)
    scale = mu64.abs().amax() ** 2 + lv64.exp().amax()
    assert_close_scaled(mean, mean64, rtol=RTOL[dtype] * 4, scale=mu64.abs().amax())
    assert_close_scaled(var, var64, rtol=RTOL[dtype] * 4, scale=scale)
    torch.testing.assert_close(mean, mean_none)
    torch.testing.assert_close(var, var_none)


def test_bad_tuple_dims():
    z = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="repeat"):
        fastvae.moments(z, dim=(0, 0))
    with pytest.raises(ValueError, match="at least one"):
        fastvae.moments(z, dim=())
    with pytest.raises(ValueError, match="dim must be in"):
        fastvae.variance_law(z, z, dim=(0, 3))


def test_torch_compile_fullgraph_latent_diffusion_posterior():
    """chunk(2, dim=1) of a channels_last (B, 2C, H, W) output, event_dims=3 and the clamp, compiled whole."""

    def step(h, seed):
        mean, logvar = h.chunk(2, dim=1)
        z, kl = fastvae.reparameterize_kl(mean, logvar, seed=seed, event_dims=3, logvar_clamp=(-30.0, 20.0))
        return (z * z).sum() + kl

    h = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    seed = torch.tensor([3])
    loss_c = torch.compile(step, fullgraph=True)(h, seed)
    (grad_c,) = torch.autograd.grad(loss_c, h)
    loss_e = step(h, seed)
    (grad_e,) = torch.autograd.grad(loss_e, h)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(grad_c, grad_e)


# ------------------------------------------------------------------ in-place layouts, element tiling
def _halves(layout, shape, dtype=torch.float32, spread=2.0):
    """``chunk(2, dim=1)`` of an encoder output ``(B, 2C, *spatial)`` in ``layout`` (not copied)."""
    h = (torch.randn(shape, dtype=torch.float64) * spread).to(dtype)
    if layout == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last if h.dim() == 4 else torch.channels_last_3d)
    return h, h.chunk(2, dim=1)


def _spy_kernels(monkeypatch):
    """Record ``(data_ptr, strides)`` of every tensor the kernel launchers receive."""
    from fastvae.kernels import reparameterize as kernels
    seen = []
    for name in ("forward", "backward"):
        original = getattr(kernels, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen.append((_name, [(a.data_ptr(), a.stride()) for a in args if isinstance(a, torch.Tensor)]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    return seen


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("shape", ((2, 8, 3, 4), (2, 6, 2, 3, 4)), ids=("image", "video"))
def test_halves_are_read_in_place_and_results_keep_the_memory_format(monkeypatch, layout, shape):
    """event_dims = all but the batch dim on chunk(2, dim=1) of a contiguous or channels_last encoder
    output: the kernels get the halves themselves (same data_ptr and strides, forward and backward), no
    ATen op copies around the custom ops, and z, the elementwise KL and both gradients come back in the
    halves' memory format."""
    from torch.utils._python_dispatch import TorchDispatchMode

    h, (mean, logvar) = _halves(layout, shape)
    h.requires_grad_(True)
    mean, logvar = h.chunk(2, dim=1)
    seen = _spy_kernels(monkeypatch)
    top_level = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            top_level.append(str(func))
            return func(*args, **(kwargs or {}))

    expected_format = torch.empty_like(mean).stride()
    with use_backend("triton"), Record():
        z, kl = fastvae.reparameterize_kl(mean, logvar, seed=4, reduction="per_sample", event_dims=len(shape) - 1)
        kl_none = fastvae.kl_divergence(mean, logvar, reduction="none", event_dims=len(shape) - 1)
        grad_mean, grad_logvar = torch.autograd.grad((z * z).sum() + kl.sum(), (mean, logvar))
    assert z.stride() == kl_none.stride() == grad_mean.stride() == grad_logvar.stride() == expected_format
    if layout == "channels_last":
        memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        assert z.is_contiguous(memory_format=memory_format) and grad_logvar.is_contiguous(memory_format=memory_format)
    halves = {(mean.data_ptr(), mean.stride()), (logvar.data_ptr(), logvar.stride())}
    assert [name for name, _ in seen] == ["forward", "forward", "backward"]
    for _, tensors in seen:
        assert halves <= set(tensors), (halves, tensors)
    copies = [op for op in top_level if any(word in op for word in ("copy", "clone", "contiguous", "cat", "_to_copy"))]
    assert not copies, copies


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_long_samples_split_over_programs_match_float64_reference(backend, dtype, layout):
    """Samples of 2560 elements (3 to 10 column blocks of one sample, by dtype) in both layouts, every
    reduction, with the clamp: values and gradients against the float64 reference."""
    _, (mean, logvar) = _halves(layout, (2, 8, 16, 40), dtype)
    with use_backend(backend):
        for reduction in REDUCTIONS:
            _check(mean, logvar, reduction, 3, CLAMP if reduction != "sum" else None)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_one_latent_spreads_over_many_programs(monkeypatch, layout):
    """A (1, 16, 128, 128) latent (one sample of 262144 elements) runs on >= 64 programs forward and
    backward, one launch each (and the workspace memset of the per-sample reduction)."""
    from fastvae.kernels import reparameterize as kernel_module

    grids = []
    monkeypatch.setattr(kernel_module, "launch", lambda kernel, grid, *a, **k: grids.append((kernel.fn.__name__, grid)))
    from fastvae.kernels import _launch

    _, (mean, logvar) = _halves(layout, (1, 32, 128, 128))
    mean.requires_grad_(True)
    with use_backend("triton"), count_launches() as launches:
        z, kl = fastvae.reparameterize_kl(mean, logvar, seed=1, reduction="per_sample", event_dims=3)
        torch.autograd.grad((z.sum(), kl.sum()), mean)
    assert [name for name, _ in grids] == ["reparameterize_kl_fwd_kernel", "reparameterize_kl_bwd_kernel"]
    assert all(grid[0] >= 64 for _, grid in grids), grids
    assert launches == {_launch.ZERO_FILL: 1}  # the kernels were captured, not run; the memset was counted


@pytest.mark.parametrize("mode", ("shuffled", "concurrent"))
@pytest.mark.parametrize("reduction", ("per_sample", "batchmean"))
def test_split_reductions_are_bit_identical_in_any_program_order(mode, reduction):
    """Two samples of 2048 elements, 4 programs each: the per-sample sums (last program of a sample) and
    the total (last sample) give the same bits whatever order and interleaving the programs run in."""
    from gpu_semantics import program_order

    _, (mean, logvar) = _halves("channels_last", (2, 8, 16, 32))
    with use_backend("triton"):
        expected = fastvae.reparameterize_kl(mean, logvar, seed=2, reduction=reduction, event_dims=3)
        for seed in (0, 1):
            with program_order(mode, seed) as order:
                actual = fastvae.reparameterize_kl(mean, logvar, seed=2, reduction=reduction, event_dims=3)
            assert order.max_programs >= 8
            assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1]), (mode, seed)


def test_layouts_the_kernel_cannot_index_are_copied_and_keep_the_format():
    """event_dims=4 of a channels_last (B, C, H, W) half (three event dims after merging): contiguous
    copies reach the kernel, the results equal the contiguous input's and keep the channels_last format."""
    _, (mean, logvar) = _halves("channels_last", (2, 8, 3, 5))
    with use_backend("triton"):
        z, kl = fastvae.reparameterize_kl(mean, logvar, seed=6, reduction="none", event_dims=4)
        z_c, kl_c = fastvae.reparameterize_kl(mean.contiguous(), logvar.contiguous(), seed=6, reduction="none",
                                              event_dims=4)
    assert z.is_contiguous(memory_format=torch.channels_last) and kl.stride() == z.stride()
    assert torch.equal(z, z_c) and torch.equal(kl, kl_c)
