"""moments, renormalize and variance_law: values and gradients against the float64 reference on both
backends and every dtype, launch counts, stability, determinism, saved tensors, bad inputs,
opcheck and torch.compile.

Tolerances (the accuracy targets of the fused ops), relative, with atol = rtol * max|expected|:
outputs of the input's dtype (``renormalize``'s output, every gradient) 1e-5 in float32, 1e-3 in
float16, 1e-2 in bfloat16 and 1e-10 in float64. Statistics come back in the accumulation dtype,
computed from inputs that are exact there, so they are held to the accumulation dtype's bound: 1e-5
(float32) for all half inputs too.
"""
from __future__ import annotations

import pytest
import torch

import fastvae
from fastvae import reference
from fastvae.kernels import count_launches
from fastvae.kernels._launch import ZERO_FILL

BACKENDS = ("triton", "torch")
pytestmark = pytest.mark.devices  # each test once per device (conftest.devices_under_test)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

# (shape, dim): one chunk (one launch for the moments) or several (partials and finish), the middle dim
# of a 3-D tensor, the last dim, a 1-D batch, a batch of one
CASES = [((5, 7), 0), ((300, 33), 0), ((4, 9, 3), 1), ((6, 5), -1), ((7,), 0), ((1, 3), 0)]


def assert_close(actual, expected, rtol):
    expected = expected.detach().double()
    atol = rtol * max(float(expected.abs().max()), 1e-12)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=atol)


def acc_rtol(dtype):
    return RTOL[reference.accumulation_dtype(dtype)]


def make(shape, dtype, *, offset=0.0):
    """Test data of ``dtype`` with grad, and its exact float64 copy."""
    z = (torch.randn(shape, dtype=torch.float64) * 2 + offset).to(dtype).requires_grad_(True)
    return z, z.detach().double().requires_grad_(True)


def strided(shape, dtype):
    """A non-contiguous view: every other row of a wider tensor, columns from 1."""
    base = torch.randn(shape[0] * 2, shape[1] + 3, dtype=torch.float64).to(dtype)
    z = base[::2, 1:shape[1] + 1].requires_grad_(True)
    assert not z.is_contiguous()
    return z, z.detach().double().requires_grad_(True)


# ---------------------------------------------------------------------------------------- moments
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", CASES)
def test_moments_matches_reference(backend, dtype, shape, dim):
    z, z64 = make(shape, dtype)
    correction = 1 if z.shape[dim] > 1 else 0
    with fastvae.use_backend(backend):
        mean, var = fastvae.moments(z, dim, correction)
        grads = [torch.randn_like(mean), torch.randn_like(var)]
        torch.autograd.backward((mean, var), grads)
    mean64, var64 = reference.moments(z64, dim, correction)
    torch.autograd.backward((mean64, var64), [g.double() for g in grads])
    assert mean.dtype == var.dtype == reference.accumulation_dtype(dtype)
    assert mean.shape == var.shape == mean64.shape
    assert_close(mean, mean64, acc_rtol(dtype))
    assert_close(var, var64, acc_rtol(dtype))
    assert z.grad.dtype == dtype
    assert_close(z.grad, z64.grad, RTOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_moments_of_strided_view(backend):
    z, z64 = strided((40, 6), torch.float32)
    with fastvae.use_backend(backend):
        mean, var = fastvae.moments(z)
        var.sum().backward()
    mean64, var64 = reference.moments(z64)
    var64.sum().backward()
    assert_close(mean, mean64, 1e-5)
    assert_close(var, var64, 1e-5)
    assert_close(z.grad, z64.grad, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moments_stable_when_mean_dominates(backend):
    """float32 data with mean 1e4 and std 1e-2: the variance to 1e-3, where the naive formula fails."""
    z = (1e4 + 1e-2 * torch.randn(1000, 33, dtype=torch.float64)).float()
    _, expected = reference.moments(z.double())

    def rel_error(var):
        return float(((var.double() - expected).abs() / expected).max())

    naive = (z * z).mean(dim=0) - z.mean(dim=0) ** 2  # E[z^2] - E[z]^2 in float32
    assert rel_error(naive) > 1.0
    with fastvae.use_backend(backend):
        mean, var = fastvae.moments(z)
    assert rel_error(var) < 1e-3
    assert_close(mean, z.double().mean(dim=0), 1e-6)


# ------------------------------------------------------------------------------------ renormalize
def targets(kind, shape, dtype):
    if kind == "number":
        return 0.5, 2.0
    if kind == "0-d":
        return torch.tensor(-1.0, dtype=dtype), torch.tensor(0.3, dtype=dtype)
    return torch.randn(shape, dtype=dtype), torch.rand(shape, dtype=dtype) + 0.5  # per dimension


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ("per_dim", "scalar"))
@pytest.mark.parametrize("shape,dim,kind", [((300, 33), 0, "tensor"), ((4, 9, 3), 1, "number"), ((6, 5), -1, "0-d")])
def test_renormalize_matches_reference(backend, dtype, mode, shape, dim, kind):
    z, z64 = make(shape, dtype, offset=3.0)
    stat_shape = z.shape[:dim % z.dim()] + z.shape[dim % z.dim() + 1:]
    target_mean, target_var = targets(kind, stat_shape, torch.float32)
    with fastvae.use_backend(backend):
        out = fastvae.renormalize(z, target_mean, target_var, dim=dim, mode=mode)
        grad = torch.randn_like(out)
        out.backward(grad)
    out64 = reference.renormalize(z64, target_mean, target_var, dim=dim, mode=mode)
    out64.backward(grad.double())
    assert out.dtype == dtype and out.shape == z.shape
    assert_close(out, out64, RTOL[dtype])
    assert_close(z.grad, z64.grad, RTOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_renormalize_strided_view_and_targets(backend):
    z, z64 = strided((40, 6), torch.float64)
    target_mean = torch.randn(12, dtype=torch.float64)[::2]  # strided per-dimension targets
    target_var = torch.rand(6, 2, dtype=torch.float64)[:, 0] + 0.1
    grad = torch.randn(40, 6, dtype=torch.float64)
    with fastvae.use_backend(backend):
        out = fastvae.renormalize(z, target_mean, target_var)
        out.backward(grad)
    out64 = reference.renormalize(z64, target_mean, target_var)
    out64.backward(grad)
    assert_close(out, out64, 1e-10)
    assert_close(z.grad, z64.grad, 1e-10)
    mean, var = reference.moments(out.detach())
    assert_close(mean, target_mean, 1e-10)
    assert_close(var, target_var, 1e-4)  # var / (var + eps) of the input


def with_constant_columns(shape, dtype, which):
    """Test data of ``dtype`` whose columns ``which`` (all, or a list) hold one value, and its float64 copy."""
    z = torch.randn(shape, dtype=torch.float64) * 2 + 1.0
    if which == "all":
        z[:] = 0.7
    else:
        z[:, which] = 0.7
    z = z.to(dtype).requires_grad_(True)
    return z, z.detach().double().requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(6, 4), (300, 5)])  # the moments in one chunk, and partials plus finish
@pytest.mark.parametrize("which", ["all", [2]])
def test_renormalize_scalar_of_constant_columns_is_finite(backend, dtype, shape, which):
    """var = 0 in some or all dimensions: ``S = mean(sqrt(var + eps))`` keeps the factor and its
    gradient finite (without eps both were inf and NaN)."""
    z, z64 = with_constant_columns(shape, dtype, which)
    grad = torch.randn(shape, dtype=torch.float64).to(dtype)
    with fastvae.use_backend(backend):
        out = fastvae.renormalize(z, 0.0, 1.5, mode="scalar")
        out.backward(grad)
    out64 = reference.renormalize(z64, 0.0, 1.5, mode="scalar")
    out64.backward(grad.double())
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()
    assert_close(out, out64, RTOL[dtype])
    assert_close(z.grad, z64.grad, RTOL[dtype])


def test_renormalize_scalar_of_constant_input_uses_eps():
    """All dimensions constant: ``S = sqrt(eps)``, so ``z' = z sqrt(target_var) / sqrt(eps)`` and, with
    ``z - mean = 0``, ``d/dz = g sqrt(target_var) / sqrt(eps)``."""
    z = torch.full((5, 3), 0.5, dtype=torch.float64, requires_grad=True)
    out = reference.renormalize(z, 0.0, 4.0, mode="scalar", eps=1e-4)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(out, torch.full((5, 3), 100.0, dtype=torch.float64))
    torch.testing.assert_close(z.grad, torch.full((5, 3), 200.0, dtype=torch.float64))


def test_renormalize_scalar_of_constant_columns_under_fp32_abi():
    """float64 with eps = 1e-7 (no float32 number) dominating every column, so that ``S`` is about
    ``sqrt(eps)``: eps reaches the kernels as a float32 hi/lo pair, not as a Python float that the GPU
    rounds to float32 (1e-8 off here)."""
    from gpu_semantics import fp32_abi

    z, z64 = with_constant_columns((300, 5), torch.float64, "all")
    z.data[:, 1] = z64.data[:, 1] = 1e-5 * torch.randn(300, dtype=torch.float64)  # var ~ 1e-10 << eps
    grad = torch.randn(300, 5, dtype=torch.float64)
    with fastvae.use_backend("triton"), fp32_abi():
        out = fastvae.renormalize(z, 0.0, 1.7, mode="scalar", eps=1e-7)
        out.backward(grad)
    out64 = reference.renormalize(z64, 0.0, 1.7, mode="scalar", eps=1e-7)
    out64.backward(grad)
    assert_close(out, out64, 1e-12)
    assert_close(z.grad, z64.grad, 1e-12)


# ----------------------------------------------------------------------------------- variance law
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 10), (300, 66)])
def test_variance_law_matches_reference(backend, dtype, shape):
    h = (torch.randn(shape, dtype=torch.float64) * 1.5).to(dtype).requires_grad_(True)
    h64 = h.detach().double().requires_grad_(True)
    mu, logvar = h.chunk(2, dim=-1)  # strided halves, read in place
    with fastvae.use_backend(backend):
        mean, var = fastvae.variance_law(mu, logvar)
        grads = [torch.randn_like(mean), torch.randn_like(var)]
        torch.autograd.backward((mean, var), grads)
    mean64, var64 = reference.variance_law(*h64.chunk(2, dim=-1))
    torch.autograd.backward((mean64, var64), [g.double() for g in grads])
    assert mean.shape == var.shape == (shape[-1] // 2,)
    assert mean.dtype == reference.accumulation_dtype(dtype)
    assert_close(mean, mean64, acc_rtol(dtype))
    assert_close(var, var64, acc_rtol(dtype))
    assert_close(h.grad, h64.grad, RTOL[dtype])


def test_variance_law_is_total_variance():
    """Var(z) of samples z ~ N(mu, exp(logvar)) is Var(mu) + E[exp(logvar)]."""
    mu = torch.randn(256, 4, dtype=torch.float64)
    logvar = torch.randn(256, 4, dtype=torch.float64) * 0.5
    z = mu + torch.exp(logvar / 2) * torch.randn(2000, 256, 4, dtype=torch.float64)
    _, var = fastvae.variance_law(mu, logvar)
    torch.testing.assert_close(z.reshape(-1, 4).var(dim=0), var, rtol=0.03, atol=0)


# --------------------------------------------------------------- gradient formulas and gradcheck
def test_reference_backward_formulas_match_autograd():
    z = torch.randn(4, 9, 3, dtype=torch.float64, requires_grad=True)
    mean, var = reference.moments(z, 1, 1)
    g_mean, g_var = torch.randn_like(mean), torch.randn_like(var)
    expected, = torch.autograd.grad((mean, var), z, (g_mean, g_var))
    torch.testing.assert_close(reference.moments_backward(g_mean, g_var, z, mean, 1, 1), expected)

    target_var = torch.rand(4, 3, dtype=torch.float64) + 0.5
    mean, var = reference.moments(z.detach(), 1)
    for mode in ("per_dim", "scalar"):
        out = reference.renormalize(z, 0.3, target_var, dim=1, mode=mode)
        grad = torch.randn_like(out)
        expected, = torch.autograd.grad(out, z, grad)
        actual = reference.renormalize_backward(grad, z, mean, var, target_var, dim=1, mode=mode)
        torch.testing.assert_close(actual, expected)
    constant = z.detach().clone()
    constant[:, :, 1] = 0.25  # var = 0 in 4 of the 12 dimensions
    constant.requires_grad_(True)
    mean, var = reference.moments(constant.detach(), 1)
    for mode in ("per_dim", "scalar"):
        out = reference.renormalize(constant, 0.3, target_var, dim=1, mode=mode, eps=0.01)
        grad = torch.randn_like(out)
        expected, = torch.autograd.grad(out, constant, grad)
        actual = reference.renormalize_backward(grad, constant, mean, var, target_var, dim=1, mode=mode, eps=0.01)
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(actual, expected)

    mu, logvar = (torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mean, var = reference.variance_law(mu, logvar)
    g_mean, g_var = torch.randn_like(mean), torch.randn_like(var)
    expected = torch.autograd.grad((mean, var), (mu, logvar), (g_mean, g_var))
    torch.testing.assert_close(reference.variance_law_backward(g_mean, g_var, mu, logvar, mean), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    z = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    target_var = torch.rand(3, 4, dtype=torch.float64) + 0.5
    with fastvae.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: fastvae.moments(t, 1, 1), (z,))
        assert torch.autograd.gradcheck(lambda t: fastvae.renormalize(t, -1.0, target_var, dim=1), (z,))
        assert torch.autograd.gradcheck(lambda t: fastvae.renormalize(t, 0.0, target_var, dim=1, mode="scalar"), (z,))
        # eps large enough to matter, and a constant dimension (var = 0, where eps alone keeps it finite)
        constant = z.detach().clone()
        constant[:, :, 2] = 0.25
        constant.requires_grad_(True)
        for eps in (0.3, 1e-6):
            def scalar(t):
                return fastvae.renormalize(t, 0.0, target_var, dim=1, mode="scalar", eps=eps)
            assert torch.autograd.gradcheck(scalar, (z,))
            assert torch.autograd.gradcheck(scalar, (constant,))
        assert torch.autograd.gradcheck(lambda t: fastvae.variance_law(*t.chunk(2, dim=-1)), (h,))


# ---------------------------------------------------------------------------------- launch counts
@pytest.mark.parametrize(
    "shape,moments_launches,renormalize_launches",
    [((5, 7), 1, 2), ((300, 33), 2, 3)],  # one chunk: no finish kernel; several: partials and finish
)
@pytest.mark.parametrize("mode", ("per_dim", "scalar"))
def test_launch_counts(shape, moments_launches, renormalize_launches, mode):
    z = torch.randn(shape, requires_grad=True)
    with fastvae.use_backend("triton"):
        with count_launches() as counts:
            mean, var = fastvae.moments(z)
        assert sum(counts.values()) == moments_launches <= 2
        with count_launches() as counts:
            (mean.sum() + var.sum()).backward()
        assert sum(counts.values()) == 1
        # scalar mode takes a ticket: its workspace is zeroed by a memset in one chunk, and by the
        # partials kernel for its finish kernel in several
        zero_fill = int(mode == "scalar" and moments_launches == 1)
        with count_launches() as counts:
            out = fastvae.renormalize(z, mode=mode)
        assert sum(counts.values()) == renormalize_launches + zero_fill <= 3
        assert counts[ZERO_FILL] == zero_fill
        with count_launches() as counts:
            out.sum().backward()
        assert sum(counts.values()) == renormalize_launches + zero_fill <= 3
        assert counts[ZERO_FILL] == zero_fill
        with count_launches() as counts:
            fastvae.variance_law(*torch.randn(shape[0], 2 * shape[1]).chunk(2, dim=-1))
        assert sum(counts.values()) == moments_launches


# ------------------------------------------------------------------------- determinism and saving
def test_deterministic_on_triton():
    z = torch.randn(300, 33, requires_grad=True)
    h = torch.randn(300, 66)
    grad = torch.randn(300, 33)

    def run():
        outputs = list(fastvae.moments(z, 0, 1)) + list(fastvae.variance_law(*h.chunk(2, dim=-1)))
        for mode in ("per_dim", "scalar"):
            target_var = torch.rand(33, generator=torch.Generator().manual_seed(1)) + 0.5
            out = fastvae.renormalize(z, 0.5, target_var, mode=mode)
            outputs += [out, torch.autograd.grad(out, z, grad)[0]]
        return outputs

    with fastvae.use_backend("triton"):
        first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_for_backward_is_inputs_and_statistics(backend):
    z = torch.randn(40, 3, 5, requires_grad=True)
    target_var = torch.rand(3, 5) + 0.5
    n_stats = 15
    saved = []

    def pack(t):
        saved.append(t)
        return t

    def check(inputs):
        assert saved
        for t in saved:
            is_input = any(t.data_ptr() == x.data_ptr() and t.shape == x.shape for x in inputs)
            assert is_input or t.numel() <= n_stats, f"saved a tensor of shape {tuple(t.shape)}"
        saved.clear()

    with fastvae.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for mode in ("per_dim", "scalar"):
            fastvae.renormalize(z, 0.0, target_var, mode=mode).sum().backward()
            check([z, target_var])
        sum(fastvae.moments(z)).sum().backward()
        check([z])
        mu, logvar = torch.randn(40, 30, requires_grad=True).chunk(2, dim=-1)
        sum(fastvae.variance_law(mu, logvar)).sum().backward()
        check([mu, logvar])


# ------------------------------------------------------------------------------------- bad inputs
Z = torch.randn(6, 4)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: fastvae.moments(Z.long()), TypeError, "z must be float16"),
        (lambda: fastvae.moments([1.0, 2.0]), TypeError, "z must be a torch.Tensor"),
        (lambda: fastvae.moments(torch.ones(0, 4)), ValueError, "z is empty"),
        (lambda: fastvae.moments(Z, dim=2), ValueError, "dim must be in"),
        (lambda: fastvae.moments(Z, dim=1.0), TypeError, "dim must be an int"),
        (lambda: fastvae.moments(Z, correction=-1), ValueError, "correction must be >= 0"),
        (lambda: fastvae.moments(Z, correction=6), ValueError, "must be smaller than the number of samples"),
        (lambda: fastvae.moments(Z, correction=0.5), TypeError, "correction must be an int"),
        (lambda: fastvae.renormalize(Z, mode="bogus"), ValueError, "mode must be one of"),
        (lambda: fastvae.renormalize(Z, dim=-3), ValueError, "dim must be in"),
        (lambda: fastvae.renormalize(Z, eps=0.0), ValueError, "eps must be positive"),
        (lambda: fastvae.renormalize(Z, eps=None), TypeError, "eps must be a float"),
        (lambda: fastvae.renormalize(Z, torch.zeros(5)), ValueError, "target_mean must be .* per-dimension shape"),
        (lambda: fastvae.renormalize(Z, 0.0, torch.ones(1, 4)), ValueError,
         "target_var must be .* per-dimension shape"),
        (lambda: fastvae.renormalize(Z, 0.0, torch.ones(4), dim=1), ValueError, r"per-dimension shape \(6,\)"),
        (lambda: fastvae.renormalize(Z, 0.0, -1.0), ValueError, "target_var must be finite and >= 0"),
        (lambda: fastvae.renormalize(Z, float("nan")), ValueError, "target_mean must be finite"),
        (lambda: fastvae.renormalize(Z, 0.0, torch.ones(4, dtype=torch.int64)), TypeError,
         "target_var must be a floating tensor"),
        (lambda: fastvae.renormalize(Z, "0"), TypeError, "target_mean must be a number or a tensor"),
        (lambda: fastvae.renormalize(Z, torch.zeros(4, device="meta")), ValueError,
         "target_mean must be on the device"),
        (lambda: fastvae.renormalize(Z, 0.0, torch.ones(4, requires_grad=True)), ValueError,
         "target_var requires grad"),
        (lambda: fastvae.variance_law(Z, torch.randn(6, 5)), ValueError, "same shape"),
        (lambda: fastvae.variance_law(Z, Z.double()), TypeError, "same dtype"),
        (lambda: fastvae.variance_law(Z, torch.randn(6, 4, device="meta")), ValueError, "same device"),
        (lambda: fastvae.variance_law(Z, Z.int()), TypeError, "logvar must be float16"),
    ],
)
def test_bad_input_raises_before_any_kernel(call, error, match):
    with fastvae.use_backend("triton"), count_launches() as counts:
        with pytest.raises(error, match=match):
            call()
    assert not counts


def test_finite_check_is_opt_in(monkeypatch):
    z = torch.randn(6, 4)
    z[2, 1] = float("nan")
    fastvae.moments(z)  # off by default: no error, NaN out
    monkeypatch.setenv("FASTVAE_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match="moments: z holds NaN"):
        fastvae.moments(z)
    with pytest.raises(ValueError, match="renormalize: target_var holds inf"):
        fastvae.renormalize(torch.randn(6, 4), 0.0, torch.tensor([1.0, float("inf"), 1.0, 1.0]))
    with pytest.raises(ValueError, match="variance_law: logvar holds inf"):
        fastvae.variance_law(torch.randn(6, 4), torch.full((6, 4), float("inf")))


# ----------------------------------------------------------------------------- opcheck and compile
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    z = torch.randn(5, 3, 4, requires_grad=True)
    mean, var = reference.moments(z.detach(), 1)
    mu, logvar = torch.randn(6, 8, requires_grad=True).chunk(2, dim=-1)
    target_var = torch.rand(5, 4) + 0.5
    scalars = reference.scalar_renormalization(var, target_var, 1e-6)
    cases = [
        (torch.ops.fastvae.moments.default, (z, 1, 1)),
        (torch.ops.fastvae.variance_law.default, (mu, logvar)),
        (torch.ops.fastvae.moments_backward.default,
         (torch.randn(5, 4), torch.randn(5, 4), z.detach(), mean, 1, 1, [True], backend)),
        (torch.ops.fastvae.variance_law_backward.default,
         (None, torch.randn(4), mu.detach(), logvar.detach(), mean[0], [True, True], backend)),
        (torch.ops.fastvae.variance_law_backward.default,
         (None, torch.randn(4), mu.detach(), logvar.detach(), mean[0], [True, False], backend)),
        (torch.ops.fastvae.renormalize.default, (z, None, target_var, 0.5, 0.0, 1, "per_dim", 1e-6)),
        (torch.ops.fastvae.renormalize.default, (z, None, None, 0.0, 2.0, 1, "scalar", 1e-6)),
        (torch.ops.fastvae.renormalize_backward.default,  # (grads of the 4 outputs, saved, arguments, needs)
         (torch.randn(5, 3, 4), None, None, None, z.detach(), mean, var, var.new_empty(0), target_var, 0.5, 0.0, 1,
          "per_dim", 1e-6, [True], backend)),
        (torch.ops.fastvae.renormalize_backward.default,
         (torch.randn(5, 3, 4), None, None, None, z.detach(), mean, var, scalars, target_var, 0.0, 0.0, 1, "scalar",
          1e-6, [True], backend)),
    ]
    with fastvae.use_backend(backend):
        for op, args in cases:
            torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    def step(h, z):
        mu, logvar = h.chunk(2, dim=-1)
        mean, var = fastvae.variance_law(mu, logvar)
        z_mean, z_var = fastvae.moments(z, 0, 1)
        out = fastvae.renormalize(z, mean.detach(), var.detach()) + fastvae.renormalize(z, mode="scalar")
        return out.sum() + mean.sum() + var.sum() + z_mean.sum() + z_var.sum()

    h = torch.randn(16, 8, requires_grad=True)
    z = torch.randn(16, 4, requires_grad=True)
    expected = step(h, z)
    expected_grads = torch.autograd.grad(expected, (h, z))
    compiled = torch.compile(step, fullgraph=True)
    with fastvae.use_backend("torch"):
        actual = compiled(h, z)
    torch.testing.assert_close(actual, expected)
    for a, e in zip(torch.autograd.grad(actual, (h, z)), expected_grads):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", ("triton", "torch"))
@pytest.mark.parametrize("op", ["moments", "variance_law", "renormalize"])
def test_backward_runs_on_the_backend_of_its_forward(backend, op):
    """A forward inside use_backend(backend) whose backward runs inside the other backend runs the
    backward of the forward's backend."""
    other = "torch" if backend == "triton" else "triton"
    h = torch.randn(7, 6, requires_grad=True)
    with fastvae.use_backend(backend):
        if op == "variance_law":
            out = fastvae.variance_law(*h.chunk(2, dim=-1))
        else:
            out = getattr(fastvae, op)(h)
    total = sum(t.sum() for t in (out if isinstance(out, tuple) else (out,)))
    with fastvae.use_backend(other), count_launches() as launches:
        total.backward()
    assert (sum(launches.values()) > 0) == (backend == "triton"), launches
